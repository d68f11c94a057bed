//! `gitproxy-agent`: parses the command line and hands over to the library.

use clap::Parser;

/// mimalloc instead of glibc malloc: a request allocates and frees many small
/// buffers across worker threads, which glibc's arenas serve at ~15 % of the
/// process's CPU (BENCHMARKS.md, "Performance, round 2").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = gitproxy_agent::config::Cli::parse();
    gitproxy_agent::main_with(cli)
}
