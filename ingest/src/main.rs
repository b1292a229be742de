#[tokio::main]
async fn main() -> std::process::ExitCode {
    usage_service_kit::service::main::<usage_ingest::IngestService>().await
}
