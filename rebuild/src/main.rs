// A rebuild allocates and frees tens of millions of small strings across
// two threads; glibc's allocator spent half the raw phase's CPU on that
// (perf, BENCHMARKS.md), mimalloc as the processors use.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    usage_rebuild::cli::main().await
}
