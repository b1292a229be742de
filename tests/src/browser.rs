//! A real browser for the dashboard's tests: headless Chromium (Debian's
//! `chromium`) driven through `chromedriver` (`chromium-driver`) over the
//! W3C WebDriver protocol, with nothing but HTTP requests.
//!
//! Each [`Browser`] is its own chromedriver process and browser profile, so
//! tests sign in as different roles side by side. Screenshots go to
//! `target/dashboard-screenshots/` (the CI keeps them as artifacts).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::{json, Value};

use crate::processes::free_port;

pub struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where screenshots are saved.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("dashboard-screenshots")
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` x
    /// `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Self> {
        Self::launch(width, height, false).await
    }

    /// A phone: 390 x 844 CSS pixels, as Chromium's device emulation lays
    /// out a page (a desktop window is never narrower than 500 px).
    pub async fn start_phone() -> anyhow::Result<Self> {
        Self::launch(390, 844, true).await
    }

    async fn launch(width: u32, height: u32, phone: bool) -> anyhow::Result<Self> {
        let port = free_port();
        let driver = tokio::process::Command::new(
            std::env::var("USAGE_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()),
        )
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start chromedriver (./stack installs chromium-driver)")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on {base} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = TempDir(std::env::temp_dir().join(crate::unique("chromium_profile")));
        let binary =
            std::env::var("USAGE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut options = json!({
            "binary": binary,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--no-first-run",
                "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
                "--force-device-scale-factor=1",
                format!("--window-size={width},{height}"),
                format!("--user-data-dir={}", profile.0.display()),
            ]
        });
        if phone {
            options["mobileEmulation"] = json!({"deviceMetrics": {
                "width": width, "height": height, "pixelRatio": 1.0, "touch": true
            }});
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await?
            .json()
            .await?;
        let session = created["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {created}"))?
            .to_string();
        let browser = Self {
            driver,
            base,
            session,
            http,
            _profile: profile,
        };
        if !phone {
            browser.resize(width, height).await?;
        }
        Ok(browser)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response: Value = request.send().await?.json().await?;
        if let Some(error) = response["value"]["error"].as_str() {
            bail!(
                "WebDriver {path}: {error}: {}",
                response["value"]["message"].as_str().unwrap_or("")
            );
        }
        Ok(response["value"].clone())
    }

    pub async fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await?;
        Ok(())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The first element matching `css`.
    async fn element(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("no element {css}"))
    }

    /// Types `text` into the element matching `css`, as a keyboard would.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let id = self.element(css).await?;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let id = self.element(css).await?;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await?;
        Ok(())
    }

    /// Waits until `condition` (a JS expression) is truthy; returns its value.
    pub async fn wait_for(&self, condition: &str, secs: u64) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self
                .js(&format!("return ({condition});"), json!([]))
                .await?;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("waited {secs} s for {condition}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the viewport (or the whole page with `full_page`) as
    /// `name.png` in [`screenshot_dir`]; returns its path.
    pub async fn screenshot(&self, name: &str, full_page: bool) -> anyhow::Result<PathBuf> {
        let png = if full_page {
            // Chromium's DevTools protocol, through chromedriver: the page
            // beyond the viewport, at any emulated width.
            let size = self
                .js(
                    "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];",
                    json!([]),
                )
                .await?;
            let shot = self
                .cdp(
                    "Page.captureScreenshot",
                    json!({"format": "png", "captureBeyondViewport": true, "clip": {
                        "x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1
                    }}),
                )
                .await?;
            shot["data"].clone()
        } else {
            self.call(reqwest::Method::GET, "/screenshot", None).await?
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .context("screenshot is not base64")?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes)?;
        Ok(path)
    }

    /// A Chrome DevTools protocol command.
    pub async fn cdp(&self, cmd: &str, params: Value) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            Some(json!({"cmd": cmd, "params": params})),
        )
        .await
    }

    pub async fn quit(mut self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
        let _ = self.driver.kill().await;
    }
}
