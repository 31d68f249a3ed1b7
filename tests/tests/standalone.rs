//! End-to-end: standalone mode. The gateway runs on a YAML file: editing the
//! file applies the change, and a PUT through the embedded admin API (with
//! curl, as a user would) lands in the file.

use std::process::Command;
use std::time::Duration;

use meshgate_tests::*;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl installed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_edits_and_admin_puts_both_apply() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let model = format!(
        "services:\n  web:\n    endpoints:\n      - address: {}\nroutes:\n  web:\n    scope: ingress\n    match:\n      path:\n        prefix: /web\n    backends:\n      - service: web\n",
        b1.addr
    );
    let (_gw, ports, file) = start_standalone(dir.path(), &model).await;
    let (ingress, ops) = (ports.ingress, ports.ops);
    let url = format!("http://127.0.0.1:{ingress}/web/page");
    let (out, _) = curl(&["-i", &url]);
    assert!(out.contains("x-served-by: b1"), "{out}");

    // Edit the file by hand: point the service at b2.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(&b1.addr.to_string(), &b2.addr.to_string());
    std::fs::write(&file, text).unwrap();
    wait_until("file edit applied", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            matches!(http_get(&url, &[]).await, Ok(r) if r.header("x-served-by") == Some("b2"))
        }
    })
    .await;

    // PUT a new route through the embedded admin API with curl.
    let api = format!("http://127.0.0.1:{ops}/api/v1/routes/hello");
    let body = r#"{"scope":"ingress","match":{"path":{"exact":"/hello"}},"direct_response":{"status":200,"body":"hi from meshgate"}}"#;
    let (out, err) = curl(&[
        "-X",
        "PUT",
        "-H",
        "content-type: application/json",
        "-d",
        body,
        "-w",
        "\n%{http_code}",
        &api,
    ]);
    assert!(out.ends_with("201"), "{out} {err}");
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(
        saved.contains("hello:") && saved.contains("hi from meshgate"),
        "{saved}"
    );
    let hello = format!("http://127.0.0.1:{ingress}/hello");
    wait_until("admin PUT applied", Duration::from_secs(10), || {
        let hello = hello.clone();
        async move { matches!(http_get(&hello, &[]).await, Ok(r) if r.body == "hi from meshgate") }
    })
    .await;
    // The hand edit survived the admin's rewrite of the file.
    assert!(saved.contains(&b2.addr.to_string()), "{saved}");
    // The embedded admin API explains with this gateway's own router.
    let explain = format!("http://127.0.0.1:{ops}/api/v1/explain");
    let r = http(
        "POST",
        &explain,
        &[],
        r#"{"scope": "ingress", "host": "any", "path": "/hello"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"]["route"], "hello", "{r:?}");
    assert_eq!(r.json()["result"]["direct_response"], 200, "{r:?}");
    // A broken edit is refused; the gateway keeps serving the last good config.
    std::fs::write(&file, "routes: [this is not a map").unwrap();
    // Wait on the gateway having read the broken file: its log says so.
    let log = dir.path().join("gateway.log");
    wait_until("broken file noticed", Duration::from_secs(10), || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("config file rejected")
        }
    })
    .await;
    let r = http_get(&hello, &[]).await.unwrap();
    assert_eq!(r.body, "hi from meshgate");
}
