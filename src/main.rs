//! The `chorus` binary. All wiring lives in `chorus_node::cli`.

fn main() -> std::process::ExitCode {
    chorus_node::cli::main()
}
