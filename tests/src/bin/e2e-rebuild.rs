//! `usage-rebuild`, built for the tests crate so its tests can run it as a
//! real child process and kill it. Same code as `usage-rebuild`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    usage_rebuild::cli::main().await
}
