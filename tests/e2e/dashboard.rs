//! The dashboard at `/` in a real browser (Debian's chromium, headless, driven by selenium):
//! it follows lmsd live, and its actions take effect. Saves a screenshot to the target dir.

use lmstudio_sim::SimConfig;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_lmsd_live_in_a_browser_and_unloads_from_the_page() {
    assert!(
        std::path::Path::new("/usr/bin/chromedriver").exists(),
        "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them: apt-get install chromium chromium-driver)"
    );
    let sim = start_sim(SimConfig::zero_delay()).await;
    let port = free_port();
    let extra = format!("[http]\nlisten = \"127.0.0.1:{port}\"\napi_keys = [\"k-page\"]\n");
    let daemon = TestDaemon::start_with(&sim.url(), &extra, &[]).await;
    // The page and its script come from lmsd itself.
    let page = reqwest::get(format!("http://127.0.0.1:{port}/"))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/dashboard.js"));
    // Its actions take JSON from its own origin, and only the page's few.
    let lmsd = format!("http://127.0.0.1:{port}/lmsd");
    let client = reqwest::Client::new();
    let unload_all = r#"{"v":1,"id":"x","type":"unload","all":true}"#;
    let as_form = client
        .post(&lmsd)
        .bearer_auth("k-page")
        .header("content-type", "text/plain")
        .body(unload_all)
        .send()
        .await
        .unwrap();
    assert_eq!(
        as_form.status(),
        401,
        "a form-like post from anywhere is refused"
    );
    let elsewhere = client
        .post(&lmsd)
        .bearer_auth("k-page")
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .body(unload_all)
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 401);
    let reload = client
        .post(&lmsd)
        .bearer_auth("k-page")
        .header("content-type", "application/json")
        .body(r#"{"v":1,"id":"x","type":"reload"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400, "reload is lmsd-ctl's");
    let keyless = client
        .get(format!("http://127.0.0.1:{port}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), 401);
    let screenshot = lmsd_bin().with_file_name("dashboard.png");
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("tickets.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"id": i, "input": format!("ticket {i}: it crashes")}).to_string()
        })
        .collect();
    std::fs::write(&job, lines.join("\n")).unwrap();
    python_script(
        "dashboard/check.py",
        &[
            &format!("http://127.0.0.1:{port}/"),
            "k-page",
            ctl_bin().to_str().unwrap(),
            daemon.socket.to_str().unwrap(),
            "ibm/granite-4-micro",
            screenshot.to_str().unwrap(),
            job.to_str().unwrap(),
        ],
        "dashboard: ok",
    )
    .await;
    assert!(screenshot.exists());
}
