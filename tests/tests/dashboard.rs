//! The provider dashboard in a real browser (headless Chromium through
//! chromedriver), on the real pipeline: what a person sees on each page is
//! what the query API answers, and what the API answers is what the test
//! sent. Then who may see what, the session cookie, and cross-site requests.
//!
//! Account X owns A1 (agency) and A2 (free, 40 of its 50 generations used:
//! a warning); account Y owns B (pro). Screenshots of every page go to
//! `target/dashboard-screenshots/`.

use std::collections::BTreeMap;

use chrono::{Datelike, Duration, Utc};
use serde_json::{json, Value};
use usage_e2e::browser::Browser;
use usage_e2e::http;
use usage_e2e::pipeline::{admin_token, event, token, Pipeline, Site};
use usage_service_kit::auth::{Claims, JwtVerifier, Role, DEV_SECRET};

/// The sites and what each sent: (site, plan, [(count, model, prompt, completion, days ago)]).
struct Fleet {
    a1: Site,
    a2: Site,
    b: Site,
}

type Sent = Vec<(u32, &'static str, u32, u32, i64)>;

fn sent(fleet: &Fleet) -> Vec<(&Site, &'static str, Sent)> {
    vec![
        (
            &fleet.a1,
            "agency",
            vec![
                (30, "gpt-4o-mini", 1000, 50, 0),
                (10, "gpt-4o", 800, 100, 1),
            ],
        ),
        (&fleet.a2, "free", vec![(40, "gpt-4o-mini", 200, 20, 0)]),
        (&fleet.b, "pro", vec![(5, "gpt-4-turbo", 500, 60, 0)]),
    ]
}

fn cost(model: &str, prompt: u32, completion: u32) -> f64 {
    let (p, c) = match model {
        "gpt-4o" => (0.0025, 0.01),
        "gpt-4-turbo" => (0.01, 0.03),
        _ => (0.00015, 0.0006),
    };
    (f64::from(prompt) * p + f64::from(completion) * c) / 1000.0
}

/// (generations, tokens, cost) of what `sites` sent on days matching `day_ok`.
fn truth(fleet: &Fleet, only: &[&str], day_ok: impl Fn(i64) -> bool) -> (u64, u64, f64) {
    let mut total = (0, 0, 0.0);
    for (site, _, batches) in sent(fleet) {
        if !only.contains(&site.install_id.as_str()) {
            continue;
        }
        for (n, model, prompt, completion, ago) in batches {
            if day_ok(ago) {
                total.0 += u64::from(n);
                total.1 += u64::from(n * (prompt + completion));
                total.2 += f64::from(n) * cost(model, prompt, completion);
            }
        }
    }
    total
}

async fn load() -> (Pipeline, Fleet) {
    let p = Pipeline::start(true).await;
    let (a1, mut a2, b) = (Site::new(1), Site::new(2), Site::new(3));
    a2.account_id = a1.account_id.clone();
    let fleet = Fleet { a1, a2, b };
    // Events a few minutes old, on today's and yesterday's UTC dates.
    let now = Utc::now() - Duration::seconds(10);
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let mut id = 0u128;
    for (site, plan, batches) in sent(&fleet) {
        assert_eq!(p.register(site, plan).await.0, 201);
        let mut events = Vec::new();
        for (n, model, prompt, completion, ago) in batches {
            for k in 0..n {
                id += 1;
                let at = if ago == 0 {
                    midnight + (now - midnight) * k as i32 / n as i32
                } else {
                    midnight - Duration::days(ago)
                        + Duration::hours(12)
                        + Duration::seconds(k.into())
                };
                let at = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                events.push(event(
                    id,
                    &site.user_hash(k % 3 + 1),
                    "inline",
                    model,
                    prompt,
                    completion,
                    &at,
                ));
            }
        }
        assert_eq!(p.send(site, site.batch(events)).await.0, 200);
    }
    let from = (Utc::now().date_naive() - Duration::days(1)).to_string();
    for (site, _, batches) in sent(&fleet) {
        let n: u32 = batches.iter().map(|b| b.0).sum();
        p.wait_for_requests(site, &from, n.into()).await;
    }
    p.wait_for_registry_mirror(3).await;
    // A2's cap warning (40 of 50) in the governance history.
    let decisions = format!(
        "http://{}/provider/usage/decisions?install_id={}",
        p.query_addr, fleet.a2.install_id
    );
    usage_e2e::eventually(
        "A2's cap warning",
        std::time::Duration::from_secs(30),
        || {
            let decisions = decisions.clone();
            async move {
                let r: Value = http()
                    .get(decisions)
                    .bearer_auth(admin_token())
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                r["decisions"]
                    .as_array()?
                    .iter()
                    .any(|d| d["kind"] == "cap_warning")
                    .then_some(())
            }
        },
    )
    .await;
    (p, fleet)
}

fn role_token(role: Role, account: Option<&str>, installs: &[&Site]) -> String {
    JwtVerifier::new(DEV_SECRET.as_bytes()).sign(&Claims {
        sub: format!("{role:?}"),
        role,
        account_id: account.map(str::to_string),
        install_ids: (!installs.is_empty())
            .then(|| installs.iter().map(|s| s.install_id.clone()).collect()),
        user_hash: installs.first().map(|s| s.user_hash(1)),
        exp: Utc::now().timestamp() + 3600,
        ..Default::default()
    })
}

// ------------------------------------------------------------ the page

const READY: &str = "document.querySelector('#page') && ['ready', 'error'].includes(document.querySelector('#page').dataset.state) && document.querySelector('#page').dataset.route";

/// Signs in through the form, as a person would: types the token, submits.
async fn sign_in(browser: &Browser, p: &Pipeline, token: &str) {
    browser
        .goto(&format!("http://{}/dashboard/", p.query_addr))
        .await
        .unwrap();
    browser
        .wait_for("document.querySelector('#page') && document.querySelector('#page').dataset.state === 'signed-out'", 30)
        .await
        .unwrap();
    browser.type_into("#token", token).await.unwrap();
    browser
        .click("#sign-in-form button[type=submit]")
        .await
        .unwrap();
    browser.wait_for(READY, 60).await.unwrap();
}

/// Opens `hash` and waits until it is drawn; its state (`ready`/`error`).
async fn open(browser: &Browser, hash: &str) -> String {
    browser
        .js("location.hash = arguments[0];", json!([hash]))
        .await
        .unwrap();
    let path = hash.split('?').next().unwrap();
    browser
        .wait_for(
            &format!("{READY} === {path:?} && document.querySelector('#page').dataset.state"),
            60,
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// One number on the page: the request it came from, where in the answer,
/// the number, its format and the text a person reads.
#[derive(Debug)]
struct Figure {
    source: String,
    path: String,
    value: f64,
    format: String,
    text: String,
}

async fn figures(browser: &Browser) -> Vec<Figure> {
    let list = browser
        .js(
            "return [...document.querySelectorAll('#page [data-figure]')].map(el => {
                const src = el.closest('[data-source]');
                return [src ? src.dataset.source : '', el.dataset.figure, el.dataset.value,
                        el.dataset.format, el.textContent];
            });",
            json!([]),
        )
        .await
        .unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|f| f[2].as_str() != Some(""))
        .map(|f| Figure {
            source: f[0].as_str().unwrap().to_string(),
            path: f[1].as_str().unwrap().to_string(),
            value: f[2].as_str().unwrap().parse().unwrap(),
            format: f[3].as_str().unwrap().to_string(),
            text: f[4].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The text the dashboard shows for `v` (README, "The dashboard").
fn shown(v: f64, format: &str) -> String {
    fn grouped(whole: u64) -> String {
        let digits = whole.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
    let fixed = |v: f64, decimals: usize| {
        let text = format!("{:.*}", decimals, v.abs());
        let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
        let whole = grouped(whole.parse().unwrap());
        if frac.is_empty() {
            whole
        } else {
            format!("{whole}.{frac}")
        }
    };
    match format {
        "int" => fixed(v, 0),
        "pct" => format!("{}%", fixed(v, 1)),
        "dec1" => fixed(v, 1),
        "dec2" => fixed(v, 2),
        "usd" => {
            let sign = if v < 0.0 { "-" } else { "" };
            let a = v.abs();
            if a == 0.0 {
                "$0.00".into()
            } else if a >= 100.0 {
                format!("{sign}${}", fixed(a, 0))
            } else if a >= 0.01 {
                format!("{sign}${}", fixed(a, 2))
            } else {
                format!("{sign}${}", fixed(a, 4))
            }
        }
        other => panic!("unknown format {other}"),
    }
}

fn at_path<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) if v.is_array() => &v[i],
            _ => &v[key],
        })
}

/// Every figure on the page equals the API's answer to the page's own
/// request, and reads as that number formatted; the answers, by request.
async fn page_equals_api(
    browser: &Browser,
    p: &Pipeline,
    bearer: &str,
    page: &str,
) -> BTreeMap<String, Value> {
    let (figures, answers) = figures_and_answers(browser, p, bearer, page).await;
    assert_figures_are_answers(page, &figures, &answers);
    answers
}

/// The page's figures, and the API's answer for each of their sources.
async fn figures_and_answers(
    browser: &Browser,
    p: &Pipeline,
    bearer: &str,
    page: &str,
) -> (Vec<Figure>, BTreeMap<String, Value>) {
    let figures = figures(browser).await;
    assert!(!figures.is_empty(), "{page}: no figures");
    let mut answers = BTreeMap::new();
    for f in &figures {
        if !answers.contains_key(&f.source) {
            let r = http()
                .get(format!("http://{}{}", p.query_addr, f.source))
                .bearer_auth(bearer)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{page}: {}", f.source);
            answers.insert(f.source.clone(), r.json::<Value>().await.unwrap());
        }
    }
    (figures, answers)
}

fn assert_figures_are_answers(page: &str, figures: &[Figure], answers: &BTreeMap<String, Value>) {
    for f in figures {
        let api = at_path(&answers[&f.source], &f.path);
        let api = api
            .as_f64()
            .unwrap_or_else(|| panic!("{page}: {} {} is {api}", f.source, f.path));
        // The same double, give or take serde_json's last-digit parsing
        // (it does not round-trip floats exactly by default).
        assert!(
            (f.value - api).abs() <= 1e-12 * api.abs().max(1.0),
            "{page}: {} at {}: page {} API {api}",
            f.path,
            f.source,
            f.value
        );
        assert_eq!(
            f.text,
            shown(api, &f.format),
            "{page}: {} at {}",
            f.path,
            f.source
        );
    }
}

/// The page's charts: each an SVG with at least one drawn series.
async fn charts(browser: &Browser) -> u64 {
    browser
        .js(
            "return [...document.querySelectorAll('#page svg.chart')].filter(svg =>
                [...svg.querySelectorAll('path.line, rect[data-series]')]
                    .some(el => (el.getAttribute('d') || el.getAttribute('height') || '').length > 0)
            ).length;",
            json!([]),
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap()
}

async fn page_text(browser: &Browser) -> String {
    browser
        .js(
            "return document.querySelector('#page').innerText;",
            json!([]),
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// Controls a keyboard reaches and a screen reader names: no control
/// without a label, no button without text, nothing taken out of the tab order.
async fn accessible(browser: &Browser, page: &str) {
    let problems = browser
        .js(
            "return [...document.querySelectorAll('input, select, textarea, button, a[href]')]
                .filter(el => el.offsetParent !== null)
                .filter(el => (el.tabIndex < 0)
                    || (['INPUT', 'SELECT', 'TEXTAREA'].includes(el.tagName) && el.labels.length === 0)
                    || (el.tagName === 'BUTTON' && el.textContent.trim() === ''))
                .map(el => el.outerHTML.slice(0, 120));",
            json!([]),
        )
        .await
        .unwrap();
    assert_eq!(problems, json!([]), "{page}");
}

fn installs(answer: &Value) -> Vec<String> {
    answer["installations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["install_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_dashboard_shows_the_api_figures_and_the_api_the_events_sent() {
    let (p, fleet) = load().await;
    let (a1, a2, b) = (&fleet.a1, &fleet.a2, &fleet.b);
    let all = [
        a1.install_id.as_str(),
        a2.install_id.as_str(),
        b.install_id.as_str(),
    ];
    let today = Utc::now().date_naive();
    let yesterday_this_month = (today - Duration::days(1)).month() == today.month();
    let admin = admin_token();
    let browser = Browser::start(1280, 900).await.unwrap();
    sign_in(&browser, &p, &admin).await;
    // The token is nowhere the page can reach: not in the URL, not in a
    // cookie scripts can read.
    let where_ = browser
        .js("return [location.href, document.cookie];", json!([]))
        .await
        .unwrap();
    assert!(!where_[0].as_str().unwrap().contains(&admin[..20]));
    assert_eq!(where_[1], "");

    // Overview.
    assert_eq!(open(&browser, "#/overview").await, "ready");
    let answers = page_equals_api(&browser, &p, &admin, "overview").await;
    let (_, overview) = answers.iter().next().unwrap();
    let d = &overview["data"];
    let (gens, tokens, usd) = truth(&fleet, &all, |_| true);
    assert_eq!(d["installations"]["total"], 3);
    assert_eq!(d["installations"]["active_30d"], 3);
    assert_eq!(d["usage"]["all_time"]["generations"], gens);
    assert_eq!(d["usage"]["all_time"]["tokens"], tokens);
    assert!((d["usage"]["all_time"]["cost_usd"].as_f64().unwrap() - usd).abs() < 1e-9);
    let (mtd, _, _) = truth(&fleet, &all, |ago| ago == 0 || yesterday_this_month);
    assert_eq!(d["usage"]["month_to_date"]["generations"], mtd);
    assert_eq!(
        d["revenue"]["month_usd"], 62.98,
        "agency 49.99 + pro 12.99 + free 0"
    );
    let top: Vec<&str> = d["top_by_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["install_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        top,
        [
            a1.install_id.as_str(),
            a2.install_id.as_str(),
            b.install_id.as_str()
        ]
    );
    assert_eq!(
        d["near_cap"],
        json!([{"install_id": a2.install_id, "account_id": a2.account_id, "plan": "free",
                "used": 40, "cap": 50, "percent": 80.0, "level": "warning"}])
    );
    assert!(page_text(&browser).await.contains("62.98"));
    assert_eq!(charts(&browser).await, 1);
    accessible(&browser, "overview").await;
    browser.screenshot("test-overview", true).await.unwrap();

    // Installations: the list, then a search by account.
    assert_eq!(open(&browser, "#/installations").await, "ready");
    let answers = page_equals_api(&browser, &p, &admin, "installations").await;
    let list = answers.values().next().unwrap();
    assert_eq!(installs(list), top);
    let (a1_gens, a1_tokens, _) = truth(&fleet, &[&a1.install_id], |_| true);
    assert_eq!(list["installations"][0]["total_requests"], a1_gens);
    assert_eq!(list["installations"][0]["total_tokens"], a1_tokens);
    accessible(&browser, "installations").await;
    browser
        .screenshot("test-installations", true)
        .await
        .unwrap();
    assert_eq!(
        open(&browser, &format!("#/installations?q={}", a1.account_id)).await,
        "ready"
    );
    let answers = page_equals_api(&browser, &p, &admin, "installations search").await;
    let mut found = installs(answers.values().next().unwrap());
    found.sort();
    let mut x = vec![a1.install_id.clone(), a2.install_id.clone()];
    x.sort();
    assert_eq!(found, x);

    // An installation: cap progress, timeline, breakdowns, history, export.
    assert_eq!(
        open(&browser, &format!("#/installations/{}", a2.install_id)).await,
        "ready"
    );
    let answers = page_equals_api(&browser, &p, &admin, "installation").await;
    let info = &answers[&format!("/provider/installations/{}", a2.install_id)]["data"];
    assert_eq!(
        (
            &info["cap"]["used"],
            &info["cap"]["cap"],
            &info["cap"]["percent"],
            &info["cap"]["level"]
        ),
        (&json!(40), &json!(50), &json!(80.0), &json!("warning"))
    );
    assert_eq!(info["usage"]["all_time"]["generations"], 40);
    assert_eq!(info["plan"], "free");
    let text = page_text(&browser).await;
    assert!(text.contains("Used 40 of 50 generations (80.0%)"), "{text}");
    assert!(
        text.contains("cap warning"),
        "the warning in the history: {text}"
    );
    assert_eq!(charts(&browser).await, 1);
    accessible(&browser, "installation").await;
    browser.screenshot("test-installation", true).await.unwrap();
    // The export button downloads the contract's CSV: the same bytes the API gives.
    browser
        .click("#page form.controls button[type=submit]")
        .await
        .unwrap();
    let status = browser
        .wait_for("document.querySelector('#export-status').textContent.startsWith('Downloaded') && document.querySelector('#export-status').textContent", 30)
        .await
        .unwrap();
    let csv = http()
        .post(format!("http://{}/api/usage/export", p.query_addr))
        .bearer_auth(&admin)
        .json(&json!({"install_id": a2.install_id, "date_from": (today - Duration::days(29)).to_string(),
                      "date_to": today.to_string(), "group_by": "day", "format": "csv"}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        status,
        json!(format!(
            "Downloaded {} bytes.",
            shown(csv.len() as f64, "int")
        ))
    );

    // Analytics, projection, anomalies.
    assert_eq!(open(&browser, "#/analytics").await, "ready");
    let answers = page_equals_api(&browser, &p, &admin, "analytics").await;
    let a = &answers.values().next().unwrap()["data"];
    let models: u64 = a["cost_by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["generations"].as_u64().unwrap())
        .sum();
    assert_eq!(models, gens);
    // This month: B 5 generations (1-9), A2 40 and A1 30 or 40 (10-99).
    let buckets: Vec<u64> = a["distribution"]["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["installations"].as_u64().unwrap())
        .collect();
    assert_eq!(buckets, [0, 1, 2, 0, 0, 0, 0]);
    assert!(charts(&browser).await >= 5);
    browser.screenshot("test-analytics", true).await.unwrap();

    // The projection moves with the clock (by the minute): the page is
    // compared with the API's answer of the same minute, opened again if
    // the minute turned between the two.
    let mut same_minute = None;
    for _ in 0..3 {
        assert_eq!(open(&browser, "#/projection").await, "ready");
        let (figures, answers) = figures_and_answers(&browser, &p, &admin, "projection").await;
        let as_of = answers.values().next().unwrap()["data"]["as_of"]
            .as_str()
            .unwrap()
            .replace('T', " ")
            .replace('Z', " UTC");
        if page_text(&browser)
            .await
            .contains(&format!("as of {as_of}"))
        {
            same_minute = Some((figures, answers));
            break;
        }
    }
    let (figures, answers) = same_minute.expect("the page and the API agree on the minute");
    assert_figures_are_answers("projection", &figures, &answers);
    let f = &answers.values().next().unwrap()["data"]["fleet"];
    assert_eq!(
        f["generations"]["month_to_date"].as_f64().unwrap(),
        mtd as f64
    );
    assert!(f["generations"]["low"].as_f64().unwrap() >= mtd as f64);
    assert!(page_text(&browser).await.contains("Method."));
    assert_eq!(charts(&browser).await, 1);
    browser.screenshot("test-projection", true).await.unwrap();

    assert_eq!(open(&browser, "#/anomalies").await, "ready");
    let text = page_text(&browser).await;
    assert!(
        text.contains("Method.") && text.contains("28 days"),
        "{text}"
    );
    browser.screenshot("test-anomalies", true).await.unwrap();
    browser.quit().await;

    // A phone: nothing wider than the screen but the tables' own scrolling.
    let phone = Browser::start_phone().await.unwrap();
    sign_in(&phone, &p, &admin).await;
    for page in [
        "#/overview",
        "#/analytics",
        &format!("#/installations/{}", a1.install_id),
    ] {
        assert_eq!(open(&phone, page).await, "ready");
        let wide = phone
            .js(
                "return [document.documentElement.scrollWidth,
                         [...document.querySelectorAll('body *')]
                            .filter(el => el.getBoundingClientRect().right > 391
                                          && !el.closest('.table-wrap'))
                            .slice(0, 5).map(el => el.outerHTML.slice(0, 100))];",
                json!([]),
            )
            .await
            .unwrap();
        assert!(
            wide[0].as_u64().unwrap() <= 390,
            "{page} is too wide: {wide}"
        );
    }
    phone.screenshot("test-overview-phone", true).await.unwrap();
    phone.quit().await;
    p.stop().await;
}

#[tokio::test]
async fn each_role_sees_its_own_fleet_and_no_other() {
    let (p, fleet) = load().await;
    let (a1, a2, b) = (&fleet.a1, &fleet.a2, &fleet.b);
    let x = Some(a1.account_id.as_str());
    let account = token(Role::Account, x);
    let browser = Browser::start(1280, 900).await.unwrap();
    sign_in(&browser, &p, &account).await;
    assert_eq!(open(&browser, "#/overview").await, "ready");
    let answers = page_equals_api(&browser, &p, &account, "account overview").await;
    let d = &answers.values().next().unwrap()["data"];
    assert_eq!(d["installations"]["total"], 2);
    let (gens, _, _) = truth(&fleet, &[&a1.install_id, &a2.install_id], |_| true);
    assert_eq!(d["usage"]["all_time"]["generations"], gens);
    assert!(!page_text(&browser).await.contains(&b.install_id));
    assert_eq!(open(&browser, "#/installations").await, "ready");
    let answers = page_equals_api(&browser, &p, &account, "account installations").await;
    assert_eq!(installs(answers.values().next().unwrap()).len(), 2);
    for page in ["#/analytics", "#/projection", "#/anomalies"] {
        assert_eq!(open(&browser, page).await, "ready", "{page}");
        assert!(!page_text(&browser).await.contains(&b.install_id), "{page}");
    }
    // Another account's installation, opened by its address.
    assert_eq!(
        open(&browser, &format!("#/installations/{}", b.install_id)).await,
        "error"
    );
    let text = page_text(&browser).await;
    assert!(text.contains("may not see this page"), "{text}");
    assert!(!text.contains("Used "), "{text}");
    browser.screenshot("test-forbidden", false).await.unwrap();
    // Signing out ends the session: the API no longer answers the browser.
    browser.click("#sign-out").await.unwrap();
    browser
        .wait_for(
            "document.querySelector('#page').dataset.state === 'signed-out'",
            30,
        )
        .await
        .unwrap();
    let status = browser
        .js(
            "const x = new XMLHttpRequest(); x.open('GET', '/provider/fleet/overview', false); x.send(); return x.status;",
            json!([]),
        )
        .await
        .unwrap();
    assert_eq!(status, 401);
    browser.quit().await;

    // A network admin of A1 alone; a user (no fleet at all).
    let network = role_token(Role::NetworkAdmin, x, &[a1]);
    let browser = Browser::start(1280, 900).await.unwrap();
    sign_in(&browser, &p, &network).await;
    assert_eq!(open(&browser, "#/overview").await, "ready");
    let answers = page_equals_api(&browser, &p, &network, "network overview").await;
    assert_eq!(
        answers.values().next().unwrap()["data"]["installations"]["total"],
        1
    );
    assert_eq!(
        open(&browser, &format!("#/installations/{}", a2.install_id)).await,
        "error"
    );
    browser.quit().await;
    let user = role_token(Role::User, x, &[a1]);
    let browser = Browser::start(1280, 900).await.unwrap();
    sign_in(&browser, &p, &user).await;
    assert_eq!(open(&browser, "#/overview").await, "error");
    assert!(page_text(&browser)
        .await
        .contains("a user sees its own rows only"));
    browser.quit().await;
    p.stop().await;
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_and_useless_from_another_site() {
    let (p, fleet) = load().await;
    let base = format!("http://{}", p.query_addr);
    let admin = admin_token();
    let sign_in = |headers: Vec<(&'static str, &'static str)>, token: String| {
        let mut r = http()
            .post(format!("{base}/dashboard/session"))
            .json(&json!({ "token": token }));
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    // From another site's page, or from no page at all: refused.
    for headers in [
        vec![],
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", "http://evil.example")],
    ] {
        let r = sign_in(headers, admin.clone()).await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "cross_site_request"
        );
    }
    // A bad token: 401, no cookie.
    let r = sign_in(vec![("sec-fetch-site", "same-origin")], "not.a.jwt".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // The dashboard's own page: a cookie scripts cannot read, never sent cross-site.
    let r = sign_in(vec![("sec-fetch-site", "same-origin")], admin.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("usage_session={admin}; Path=/; Max-Age=")),
        "{cookie}"
    );
    assert!(cookie.ends_with("; HttpOnly; SameSite=Strict"), "{cookie}");
    let max_age: i64 = cookie
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3500..=3600).contains(&max_age),
        "no longer than the token: {max_age}"
    );
    let session = format!("usage_session={admin}");

    // Reads work with the cookie alone.
    let r = http()
        .get(format!("{base}/provider/fleet/overview"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Changes need the dashboard's own page: an export (it reads, but is a
    // POST a form could send) and an erasure.
    let export = json!({"install_id": fleet.b.install_id, "format": "csv"});
    for (headers, status) in [
        (vec![], 403),
        (vec![("sec-fetch-site", "cross-site")], 403),
        (vec![("sec-fetch-site", "same-site")], 403),
        (vec![("origin", "http://evil.example")], 403),
        (vec![("sec-fetch-site", "same-origin")], 200),
    ] {
        let mut r = http()
            .post(format!("{base}/api/usage/export"))
            .header("cookie", &session)
            .json(&export);
        for (k, v) in &headers {
            r = r.header(*k, *v);
        }
        assert_eq!(r.send().await.unwrap().status(), status, "{headers:?}");
    }
    let r = http()
        .delete(format!(
            "{base}/api/usage/installations/{}",
            fleet.b.install_id
        ))
        .header("cookie", &session)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "cross_site_request"
    );
    // An integration with its Authorization header is not a browser session.
    let r = http()
        .post(format!("{base}/api/usage/export"))
        .bearer_auth(&admin)
        .json(&export)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Signing out clears the cookie.
    let r = http()
        .delete(format!("{base}/dashboard/session"))
        .header("cookie", &session)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["set-cookie"],
        "usage_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
    );
    // The pages themselves: strict about what they load, never framed.
    let r = http()
        .get(format!("{base}/dashboard/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let r = http()
        .get(format!("{base}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.url().path(), "/dashboard/", "the bare path redirects");
    p.stop().await;
}
