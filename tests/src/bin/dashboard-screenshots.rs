//! Signs in to a running dashboard and saves a screenshot of every page, at
//! desktop and phone widths, with how long each page took to draw: the
//! README's pictures and a quick look after a change.
//!
//! ```sh
//! cargo run -p usage-e2e --bin dashboard-screenshots -- --token "$(./stack token)"
//! ```

use clap::Parser;
use serde_json::json;
use usage_e2e::browser::{screenshot_dir, Browser};

#[derive(Parser)]
struct Args {
    /// The query service.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    url: String,
    /// A JWT to sign in with (a provider admin's shows every page filled).
    #[arg(long, env = "USAGE_DASHBOARD_TOKEN")]
    token: String,
    /// Also a phone-width (390 px) shot of each page.
    #[arg(long, default_value_t = true)]
    phone: bool,
    /// The installation for the detail page (default: the overview's top one).
    #[arg(long)]
    install_id: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let desktop = Browser::start(1280, 900).await?;
    let install = shoot(&desktop, &args, "", None).await?;
    desktop.quit().await;
    if args.phone {
        let phone = Browser::start_phone().await?;
        shoot(&phone, &args, "-phone", Some(install)).await?;
        phone.quit().await;
    }
    println!("screenshots in {}", screenshot_dir().display());
    Ok(())
}

/// Signs in and shoots every page; returns the installation it showed.
async fn shoot(
    browser: &Browser,
    args: &Args,
    suffix: &str,
    install: Option<String>,
) -> anyhow::Result<String> {
    browser.goto(&format!("{}/dashboard/", args.url)).await?;
    browser
        .wait_for(
            "document.querySelector('#page').dataset.state === 'signed-out'",
            20,
        )
        .await?;
    browser
        .screenshot(&format!("sign-in{suffix}"), false)
        .await?;
    browser.type_into("#token", &args.token).await?;
    browser.click("#sign-in-form button[type=submit]").await?;
    browser
        .wait_for(
            "document.querySelector('#page').dataset.state === 'ready'",
            60,
        )
        .await?;
    let install = match install.or_else(|| args.install_id.clone()) {
        Some(id) => id,
        None => browser
            .js(
                "const a = document.querySelector('[data-row] a'); return a ? a.textContent : '';",
                json!([]),
            )
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let pages = [
        ("overview", "#/overview".to_string()),
        ("installations", "#/installations".to_string()),
        ("installation", format!("#/installations/{install}")),
        ("analytics", "#/analytics".to_string()),
        ("projection", "#/projection".to_string()),
        ("anomalies", "#/anomalies".to_string()),
    ];
    {
        for (name, hash) in &pages {
            browser
                .js("location.hash = arguments[0];", json!([hash]))
                .await?;
            let state = browser
                .wait_for(
                    &format!(
                        "(document.querySelector('#page').dataset.route === {:?} || location.hash !== {:?}) && document.querySelector('#page').dataset.state !== 'loading' && document.querySelector('#page').dataset.state",
                        hash.split('?').next().unwrap_or(hash),
                        hash
                    ),
                    60,
                )
                .await?;
            let drawn = browser
                .js(
                    "return document.querySelector('#page').dataset.drawnMs;",
                    json!([]),
                )
                .await?;
            let path = browser.screenshot(&format!("{name}{suffix}"), true).await?;
            println!(
                "{name}{suffix}: {state} in {drawn} ms -> {}",
                path.display()
            );
        }
    }
    Ok(install)
}
