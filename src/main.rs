//! The `detox` command line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = detox::cli::Cli::parse();
    match detox::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<detox::cli::Interrupted>().is_some() => {
            eprintln!("{e}");
            std::process::ExitCode::from(detox::cli::INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
