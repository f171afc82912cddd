//! The `tokenpool` binary: parses the command line and hands over to
//! [`tokenpool::cli::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tokenpool::cli::Cli::parse();
    tokenpool::cli::init_logging(cli.log_format);
    match tokenpool::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
