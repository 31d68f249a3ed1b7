//! `meshctl` against a real etcd, admin and gateway: apply the example
//! mesh in one batch and wait for the gateway, status, diff, get, explain,
//! history, rollback, and clear errors with field paths; and what GitOps
//! needs: a `get -o yaml` that applies back unchanged, `diff`'s exit
//! status, `apply --prune -l`, standard input, contexts and token files,
//! completion, and `check`.

use std::path::{Path, PathBuf};

use meshgate_tests::*;
use serde_json::Value;

struct Ctl {
    server: String,
    token: String,
}

impl Ctl {
    /// Runs meshctl; returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(bin("meshctl"))
            .args(["--server", &self.server, "--token", &self.token])
            .args(args)
            .output()
            .expect("run meshctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "meshctl {args:?} failed:\n{out}\n{err}");
        out
    }
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/mesh.yaml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_applies_the_example_mesh_and_waits_for_every_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin {
        base: base.clone(),
        token: token.clone(),
    };
    admin.wait_up().await;
    let gws: Vec<_> = ["gw-1", "gw-2"]
        .iter()
        .map(|id| {
            start_gateway(
                dir.path(),
                id,
                &["egress", "ingress"],
                &["shop"],
                &etcd.endpoint(),
            )
        })
        .collect();
    for (_, p) in &gws {
        wait_ready(p.ops).await;
    }
    admin.wait_nodes(2).await;
    let ctl = Ctl {
        server: base,
        token,
    };
    let file = example();
    let file = file.to_str().unwrap();

    let out = ctl.ok(&["apply", "-f", file, "--wait", "10s"]);
    assert!(
        out.contains("routes    orders ") || out.contains("routes  orders"),
        "{out}"
    );
    assert!(
        out.contains("propagation: complete (applied: gw-1, gw-2; pending: )"),
        "{out}"
    );
    assert_eq!(out.matches("created").count(), 9, "{out}");
    let out = ctl.ok(&["status", "--wait", "10s"]);
    assert!(out.contains("in sync: true"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("gw-1") && l.contains("true")),
        "{out}"
    );

    // Applying again changes nothing.
    assert!(ctl.ok(&["diff", "-f", file]).starts_with("no changes"));
    assert!(ctl.ok(&["apply", "-f", file]).starts_with("no changes"));

    // An edit: diff names the field, apply replaces only that object.
    let edited = dir.path().join("mesh.yaml");
    let text = std::fs::read_to_string(file)
        .unwrap()
        .replace("weight: 5}", "weight: 20}");
    std::fs::write(&edited, text).unwrap();
    let edited = edited.to_str().unwrap();
    // diff exits 1 when there are differences (as diff and kubectl diff).
    let (same, out, _) = ctl.run(&["diff", "-f", edited]);
    assert!(!same, "differences: exit 1");
    assert!(out.contains("~ routes/orders"), "{out}");
    assert!(out.contains("backends"), "{out}");
    let out = ctl.ok(&["apply", "-f", edited, "--wait", "10s"]);
    assert!(
        out.contains("replaced") && out.contains("8 unchanged"),
        "{out}"
    );

    // get, as a table and as JSON.
    let out = ctl.ok(&["get", "routes"]);
    assert!(out.contains("mesh → orders, orders-v2"), "{out}");
    let json: Value =
        serde_json::from_str(&ctl.ok(&["-o", "json", "get", "services", "-l", "team=orders"]))
            .unwrap();
    let names: Vec<&str> = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "orders-v2"]);

    // explain runs on a gateway's router.
    let out = ctl.ok(&["explain", "--host", "orders", "-H", "x-canary: yes"]);
    assert!(out.contains("matched route orders-canary"), "{out}");
    assert!(
        out.contains("orders: matches, but a better route wins"),
        "{out}"
    );

    // history and rollback of the edit.
    let out = ctl.ok(&["history", "--kind", "routes", "--name", "orders"]);
    let versions: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(versions.len(), 2, "{out}");
    let first = versions[1];
    ctl.ok(&["rollback", "routes", "orders", first]);
    assert!(ctl.ok(&["diff", "-f", file]).starts_with("no changes"));

    // Errors: the field path, and a non-zero exit; nothing changed.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "services:\n  broken:\n    endpoints: [{address: nowhere}]\n",
    )
    .unwrap();
    let (ok, _, err) = ctl.run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("endpoints[0].address"), "{err}");
    // Every invalid object of a file is listed, each with its path.
    std::fs::write(
        &bad,
        "services:\n  broken:\n    endpoints: [{address: nowhere}]\n  \
         worse:\n    endpoints: [{address: '127.0.0.1:1', weight: 0}]\n    timeouts: {request_ms: -1}\n\
         routes:\n  lost:\n    backends: []\n",
    )
    .unwrap();
    let (ok, _, err) = ctl.run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!ok, "{err}");
    for path in [
        "services/broken: endpoints[0].address",
        "services/worse: timeouts.request_ms",
        "routes/lost: ",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
    // Objects valid on their own but refused by the server (each refers to
    // a service that does not exist): every one is named, not `items[i]`.
    std::fs::write(
        &bad,
        "routes:\n  ghost-a:\n    match: {hosts: [a]}\n    backends: [{service: nobody}]\n  \
         ghost-b:\n    match: {hosts: [b]}\n    backends: [{service: no-one}]\n",
    )
    .unwrap();
    let (ok, _, err) = ctl.run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!ok, "{err}");
    for path in [
        "routes/ghost-a: backends[0].service",
        "routes/ghost-b: backends[0].service",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
    assert!(!err.contains("items["), "{err}");
    let (ok, _, err) = ctl.run(&["delete", "services", "orders-v2"]);
    assert!(
        !ok && err.contains("still referenced by routes/orders"),
        "{err}"
    );
    let (ok, _, err) = ctl.run(&["get", "widgets"]);
    assert!(!ok && err.contains("unknown config kind"), "{err}");
    assert_eq!(admin.get("services/broken").await.status, 404);
}

/// `meshctl suggest-callers` seeds `allowed_callers` from the
/// `destinations` services declare; `--apply` sets them where no list
/// exists yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_callers_from_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin {
        base: base.clone(),
        token: token.clone(),
    };
    admin.wait_up().await;
    for (path, body) in [
        ("groups/shop", serde_json::json!({})),
        ("services/orders", serde_json::json!({"group": "shop"})),
        (
            "services/ledger",
            serde_json::json!({"allowed_callers": ["billing"]}),
        ),
        (
            "services/front",
            serde_json::json!({"group": "shop", "destinations": [{"service": "orders"}, {"service": "ledger"}]}),
        ),
        (
            "services/billing",
            serde_json::json!({"destinations": [{"service": "orders"}]}),
        ),
    ] {
        assert_eq!(admin.put(path, &body).await.status, 201, "{path}");
    }
    let ctl = Ctl {
        server: base,
        token,
    };
    let out = ctl.ok(&["suggest-callers"]);
    assert!(
        out.contains("orders: allowed_callers: [billing, group/shop/service/front]\n"),
        "{out}"
    );
    assert!(
        out.contains(
            "ledger: allowed_callers: [group/shop/service/front] (has its own list: left alone)"
        ),
        "{out}"
    );
    assert!(!out.contains("front:"), "nobody calls front: {out}");
    // Nothing changed until --apply.
    assert!(admin.get("services/orders").await.json()["spec"]["allowed_callers"].is_null());
    let out = ctl.ok(&["suggest-callers", "--apply"]);
    assert!(out.contains("(applied)"), "{out}");
    assert_eq!(
        admin.get("services/orders").await.json()["spec"]["allowed_callers"],
        serde_json::json!(["billing", "group/shop/service/front"])
    );
    assert_eq!(
        admin.get("services/ledger").await.json()["spec"]["allowed_callers"],
        serde_json::json!(["billing"]),
        "an existing list is left alone"
    );
}

/// Runs meshctl with exactly `args` (no server or token added), with
/// `stdin`; returns (exit code, stdout, stderr).
fn meshctl_raw(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(bin("meshctl"))
        .args(args)
        .env_remove("HOME")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run meshctl");
    // A command that exits before reading (a usage error) closes the
    // pipe: what it did not read is not part of the test.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_serves_gitops_round_trips_prune_contexts_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut etcd = Etcd::start(d).await;
    let (_admin, base, token) = start_admin(d, &etcd.endpoint());
    let admin = Admin {
        base: base.clone(),
        token: token.clone(),
    };
    admin.wait_up().await;
    // The token in a file, and a contexts file naming the server: no
    // token in argv from here on.
    let token_file = d.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let contexts = d.join("contexts.yaml");
    std::fs::write(
        &contexts,
        format!(
            "current: test\ncontexts:\n  test: {{server: \"{base}\", token_file: \"{}\"}}\n",
            token_file.display()
        ),
    )
    .unwrap();
    let ctx = contexts.to_str().unwrap().to_string();
    let run = |args: &[&str], stdin: &str| {
        let mut all = vec!["--contexts", ctx.as_str()];
        all.extend_from_slice(args);
        meshctl_raw(&all, stdin)
    };
    let example = example();
    let (code, out, err) = run(&["apply", "-f", example.to_str().unwrap()], "");
    assert_eq!(code, 0, "{out}{err}");

    // get -o yaml of everything applies back unchanged.
    let (code, backup, err) = run(&["-o", "yaml", "get", "all"], "");
    assert_eq!(code, 0, "{err}");
    assert!(
        backup.contains("services:") && backup.contains("routes:"),
        "{backup}"
    );
    let (code, out, err) = run(&["diff", "-f", "-"], &backup);
    assert_eq!(code, 0, "no differences: exit 0; {out}{err}");
    assert!(out.starts_with("no changes"), "{out}");
    let (code, out, _) = run(&["apply", "-f", "-"], &backup);
    assert_eq!(code, 0);
    assert!(out.starts_with("no changes"), "{out}");

    // Prune: the objects a selector matches that the files no longer hold.
    let two = "services:\n  gx-1: {labels: {app: gitops}}\n  gx-2: {labels: {app: gitops}}\n";
    let (code, out, err) = run(&["apply", "-f", "-"], two);
    assert_eq!(code, 0, "{out}{err}");
    let one = "services:\n  gx-1: {labels: {app: gitops}}\n";
    let (code, out, _) = run(&["diff", "-f", "-", "--prune", "-l", "app=gitops"], one);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("- services/gx-2"), "{out}");
    assert!(
        !out.contains("orders"),
        "only what the selector matches: {out}"
    );
    let (code, out, err) = run(&["apply", "-f", "-", "--prune", "-l", "app=gitops"], one);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(admin.get("services/gx-2").await.status, 404);
    assert_eq!(admin.get("services/gx-1").await.status, 200);
    assert_eq!(
        admin.get("services/orders").await.status,
        200,
        "unlabelled objects stay"
    );
    let (code, _, err) = run(&["apply", "-f", "-", "--prune"], one);
    assert_eq!(code, 2, "--prune needs a selector: {err}");

    // Consumers from a file: the key goes in clear, only its hash is
    // stored, and the same file diffs clean (both sides are compared as
    // the server shows them: keys hashed, secrets left out).
    let consumer = "consumers:\n  mobile:\n    api_keys: [{name: main, key: mobile-key-0123456789}]\n    jwt: {keys: [{kid: m1, algorithm: HS256, secret: mobile-secret-0123456789abcdef0123}]}\n";
    let (code, out, err) = run(&["apply", "-f", "-"], consumer);
    assert_eq!(code, 0, "{out}{err}");
    let stored = admin.get("consumers/mobile").await;
    assert_eq!(stored.status, 200);
    assert!(
        !stored.body.contains("mobile-key") && !stored.body.contains("mobile-secret"),
        "{}",
        stored.body
    );
    let (code, out, err) = run(&["diff", "-f", "-"], consumer);
    assert_eq!(code, 0, "the same file: no differences; {out}{err}");
    let (code, out, _) = run(&["-o", "yaml", "get", "consumers"], "");
    assert_eq!(code, 0);
    assert!(
        out.contains("sha256") && !out.contains("mobile-key"),
        "{out}"
    );

    // Contexts: an unknown one is named; --token-file works alone.
    let (code, _, err) = run(&["--context", "nosuch", "status"], "");
    assert_eq!(code, 1);
    assert!(
        err.contains("no context nosuch") && err.contains("test"),
        "{err}"
    );
    let (code, out, err) = meshctl_raw(
        &[
            "--server",
            &base,
            "--token-file",
            token_file.to_str().unwrap(),
            "get",
            "groups",
        ],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");

    // Completion scripts.
    let (code, out, _) = run(&["completion", "bash"], "");
    assert_eq!(code, 0);
    assert!(out.contains("_meshctl") && out.contains("apply"), "{out}");

    // check: no gateway yet is a problem; with one in sync, all is well;
    // etcd gone is a problem.
    let (code, out, _) = run(&["check"], "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL no live gateway"), "{out}");
    let (_gw, p) = start_gateway(d, "gw-1", &["egress"], &["shop"], &etcd.endpoint());
    wait_ready(p.ops).await;
    wait_until("check passes", std::time::Duration::from_secs(20), || {
        let ctx = ctx.clone();
        async move { meshctl_raw(&["--contexts", &ctx, "check"], "").0 == 0 }
    })
    .await;
    let (_, out, _) = run(&["check"], "");
    assert!(out.contains("ok   1 gateway(s), all in sync"), "{out}");
    etcd.stop();
    let (code, out, _) = run(&["check"], "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL etcd unreachable"), "{out}");
}
