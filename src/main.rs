//! `atelier`: the studio window (soon) and the headless subcommands.

fn main() -> std::process::ExitCode {
    atelier::cli::main()
}
