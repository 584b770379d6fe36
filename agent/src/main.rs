/// mimalloc: spans are built on the pipeline thread and freed on the export thread; glibc's
/// malloc serializes such cross-thread frees on arena locks and spent a third of the agent's CPU
/// in malloc/free under load (perf, `cargo xtask bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    kspan::cli::main()
}
