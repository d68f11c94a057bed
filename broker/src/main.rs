//! `gitproxy-broker`: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    gitproxy_broker::main_with(gitproxy_broker::config::Cli::parse())
}
