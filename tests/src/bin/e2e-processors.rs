//! The processors binary, built for the tests crate so its tests can run it
//! as a real child process and kill it (cargo builds a package's own binaries
//! for its integration tests). Same code as `usage-processors`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    usage_service_kit::service::main::<usage_processors::Processors>().await
}
