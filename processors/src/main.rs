// mimalloc: the request path allocates many small, short-lived buffers
// (JSON, Avro, Kafka records); glibc malloc was ~17% of the gateway's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    usage_service_kit::service::main::<usage_processors::Processors>().await
}
