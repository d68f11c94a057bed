//! `gitproxy-agent`: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = gitproxy_agent::config::Cli::parse();
    gitproxy_agent::main_with(cli)
}
