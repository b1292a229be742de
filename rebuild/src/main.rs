#[tokio::main]
async fn main() -> std::process::ExitCode {
    usage_rebuild::cli::main().await
}
