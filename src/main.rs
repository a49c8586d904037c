//! The `detox` command line.

use clap::{CommandFactory, FromArgMatches};

fn main() -> std::process::ExitCode {
    // Negative numbers are values (`--seed -1` is an invalid seed, not an unknown flag), in every
    // subcommand and in bench's own subcommands.
    let cmd = detox::cli::Cli::command()
        .mut_subcommands(|s| s.allow_negative_numbers(true).mut_subcommands(|s| s.allow_negative_numbers(true)));
    let cli = detox::cli::Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
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
