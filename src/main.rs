//! The `chorus` binary. All wiring lives in `chorus_node::cli`.

/// mimalloc instead of glibc's malloc: a node's memory comes and goes in bursts (a flood
/// of connections, each with buffers, that then closes), and glibc keeps what it freed in
/// per-thread arenas and fragmented heaps, so RSS stays near its peak long after. mimalloc
/// returns freed pages to the system after a short delay (its `purge_delay`, 10 ms by
/// default, decommitting with `MADV_DONTNEED`), and is fast with many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chorus_node::cli::main()
}
