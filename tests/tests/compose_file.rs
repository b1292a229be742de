//! docker-compose.yml cannot run here (no Docker engine), so this keeps it
//! honest: it parses, names the official engine images, and every service's
//! environment and ports match what its binary's config actually reads.

use std::collections::BTreeSet;

use clap::CommandFactory;
use serde_yaml::Value;

fn compose() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("docker-compose.yml exists");
    let mut value: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML");
    value.apply_merge().expect("merge keys resolve");
    value
}

/// The environment variables a binary's config declares, and its default listen port.
fn declared(cmd: clap::Command) -> (BTreeSet<String>, Option<u16>) {
    let mut envs = BTreeSet::new();
    let mut port = None;
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env() {
            envs.insert(env.to_string_lossy().into_owned());
        }
        if arg.get_id() == "listen" {
            port = arg
                .get_default_values()
                .first()
                .and_then(|v| v.to_str())
                .and_then(|v| v.rsplit(':').next())
                .and_then(|p| p.parse().ok());
        }
    }
    (envs, port)
}

fn env_of(service: &Value) -> Vec<(String, String)> {
    service["environment"]
        .as_mapping()
        .expect("environment is a mapping")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_string(),
            };
            (k.as_str().unwrap().to_string(), value)
        })
        .collect()
}

#[test]
fn services_and_engine_images() {
    let c = compose();
    let names: BTreeSet<&str> = c["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "kafka",
            "clickhouse",
            "migrate",
            "ingest",
            "processors",
            "query"
        ])
    );
    let image = |s: &str| c["services"][s]["image"].as_str().unwrap().to_string();
    assert!(
        image("kafka").starts_with("apache/kafka:4."),
        "{}",
        image("kafka")
    );
    assert!(
        image("clickhouse").starts_with("clickhouse/clickhouse-server:26.9"),
        "{}",
        image("clickhouse")
    );
}

#[test]
fn every_service_variable_and_port_matches_its_config() {
    let c = compose();
    let binaries = [
        ("ingest", "usage-ingest", usage_ingest::Config::command()),
        (
            "processors",
            "usage-processors",
            usage_processors::Config::command(),
        ),
        ("query", "usage-query", usage_query::Config::command()),
    ];
    for (name, binary, cmd) in binaries {
        let service = &c["services"][name];
        assert_eq!(
            service["build"].as_str(),
            Some("."),
            "{name} is built from the Dockerfile"
        );
        assert_eq!(
            service["command"][0].as_str(),
            Some(binary),
            "{name} runs {binary}"
        );
        let (declared_envs, default_port) = declared(cmd);
        let env = env_of(service);
        for (key, _) in &env {
            assert!(
                declared_envs.contains(key),
                "{name}: {key} is set in docker-compose.yml but {binary} does not read it"
            );
        }
        // The listen port inside the container is the binary's default port
        // and the published one.
        let listen_var = format!("USAGE_{}_LISTEN", name.to_uppercase());
        let listen = &env
            .iter()
            .find(|(k, _)| *k == listen_var)
            .expect("listen set")
            .1;
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(Some(port), default_port, "{name}: same port as `./stack`");
        let published: Vec<&str> = service["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(
            published,
            vec![format!("127.0.0.1:{port}:{port}")],
            "{name}"
        );
        // Engines are reached by their compose service names.
        assert!(
            env.contains(&(
                "USAGE_CLICKHOUSE_URL".into(),
                "http://clickhouse:8123".into()
            )) || !declared_envs.contains("USAGE_CLICKHOUSE_URL")
        );
        assert!(
            env.contains(&("USAGE_KAFKA_BROKERS".into(), "kafka:9092".into()))
                || !declared_envs.contains("USAGE_KAFKA_BROKERS")
        );
    }
}

#[test]
fn the_migration_job_reads_only_what_usage_migrate_declares() {
    let c = compose();
    let service = &c["services"]["migrate"];
    assert_eq!(service["command"][0].as_str(), Some("usage-migrate"));
    let (declared_envs, _) = declared(usage_schemas::migrations::MigrateConfig::command());
    for (key, _) in env_of(service) {
        assert!(
            declared_envs.contains(&key),
            "migrate: {key} is not read by usage-migrate"
        );
    }
}

#[test]
fn the_clickhouse_container_uses_the_same_profile_as_the_local_stack() {
    let c = compose();
    let volumes: Vec<&str> = c["services"]["clickhouse"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(volumes
        .iter()
        .any(|v| v.starts_with("./devstack/clickhouse/users.xml:")));
}
