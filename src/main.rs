//! The `tokenpool` binary: parses the command line and hands over to
//! [`tokenpool::cli::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tokenpool::cli::Cli::parse();
    let format = cli.log_format;
    tokenpool::cli::init_logging(format);
    match tokenpool::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            tokenpool::cli::fatal(format, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
