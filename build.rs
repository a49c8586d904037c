//! Compiles kernels/*.cu with nvcc to PTX for compute capability 8.0 and 9.0a and embeds it
//! (src/backend/cuda/ptx.rs includes the generated table). Without nvcc the build still succeeds,
//! CPU-only, and says so once.

use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: &[&str] = &["80", "90a"];

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DETOX_NVCC") {
        return Some(PathBuf::from(p));
    }
    // Where tools/install_nvcc.sh puts it.
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let venv = std::env::var_os("DETOX_NVCC_VENV").map(PathBuf::from).unwrap_or(home.join(".cache/detox/nvcc-venv"));
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    ["/usr/local/cuda/bin/nvcc"].iter().map(PathBuf::from).find(|p| p.is_file()).or_else(|| {
        Command::new("nvcc").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "nvcc".into())
    })
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=DETOX_NVCC");
    println!("cargo:rerun-if-env-changed=DETOX_NVCC_VENV");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect())
        .unwrap_or_default();
    sources.sort();

    let mut table = String::from(
        "/// (module name, [(arch, PTX)]) for every kernel source.\npub const MODULES: &[(&str, &[(&str, &str)])] = &[\n",
    );
    match find_nvcc() {
        None => {
            println!(
                "cargo:warning=nvcc not found: building detox without CUDA kernels (CPU only). \
                 Run tools/install_nvcc.sh or set DETOX_NVCC to build them."
            );
        }
        Some(nvcc) => {
            for src in &sources {
                let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
                table.push_str(&format!("    ({stem:?}, &[\n"));
                for arch in ARCHS {
                    let ptx = out.join(format!("{stem}.sm{arch}.ptx"));
                    compile(&nvcc, src, arch, &ptx);
                    table.push_str(&format!("        ({arch:?}, include_str!({:?})),\n", ptx.display().to_string()));
                }
                table.push_str("    ]),\n");
            }
        }
    }
    table.push_str("];\n");
    std::fs::write(out.join("ptx_table.rs"), table).unwrap();
}

fn compile(nvcc: &Path, src: &Path, arch: &str, ptx: &Path) {
    let status = Command::new(nvcc)
        .args(["-ptx", "-O3", "-std=c++17", "-lineinfo", &format!("-arch=compute_{arch}"), "-Ikernels", "-o"])
        .arg(ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed on {} for compute_{arch}", src.display());
    }
}
