//! `meshctl`: the operator's CLI over the admin API.
//!
//! Config files use the standalone format: maps of name → spec under
//! `certs`, `groups`, `consumers`, `services`, `routes`, `tcp_routes` (a directory: every
//! `.yaml`/`.yml`/`.json` file in it). `apply` sends every changed object in
//! one atomic batch, in dependency order; `diff` shows what it would change,
//! field by field. Human tables by default; `-o json|yaml` prints the API's
//! answers. Exit status: 0 done, 1 refused or failed, 2 usage.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use meshgate_admin::client;
use meshgate_config::{Key, Kind, Object};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(version, about = "Meshgate's CLI over the admin API")]
struct Cli {
    /// Admin API base URL (default: the context's, else
    /// http://127.0.0.1:9901).
    #[arg(long, env = "MESHCTL_SERVER")]
    server: Option<String>,
    /// PEM roots the admin API's certificate must chain to, for an
    /// `https://` server (default: the context's, else the system's roots).
    #[arg(long, env = "MESHCTL_CACERT")]
    cacert: Option<PathBuf>,
    /// Bearer token (or MESHCTL_TOKEN). Prefer `--token-file`: a token in
    /// argv is visible to every user of the machine.
    #[arg(long, env = "MESHCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file whose first line is the bearer token.
    #[arg(long, env = "MESHCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The context to use from the contexts file (default: its `current`).
    #[arg(long, env = "MESHCTL_CONTEXT")]
    context: Option<String>,
    /// The contexts file (default: ~/.config/meshgate/contexts.yaml):
    /// `current: <name>` and `contexts: {<name>: {server, token_file,
    /// cacert}}`.
    #[arg(long, env = "MESHCTL_CONTEXTS")]
    contexts: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List objects of a kind, or show one.
    Get {
        kind: String,
        name: Option<String>,
        /// Label selector, e.g. `team=a,tier=gold`.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// Create or replace every object of the files (`-` reads standard
    /// input), in one atomic batch; with `--prune`, also delete the objects
    /// matching the selector that the files no longer hold.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Wait until every live gateway has applied it (e.g. `10s`).
        #[arg(long)]
        wait: Option<String>,
        /// Delete what the files no longer hold, among the objects the
        /// selector (`-l`, required) matches.
        #[arg(long, requires = "selector")]
        prune: bool,
        /// Label selector of the objects `--prune` may delete.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// What `apply` would change (with `--prune -l`, the removals too);
    /// exits 1 when there are differences, 0 when none.
    Diff {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[arg(long, requires = "selector")]
        prune: bool,
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// Checks the mesh in one go: the admin API and etcd, every gateway
    /// in sync, every sidecar's policy fresh, no refused config, no
    /// identity or served certificate close to expiry; exits 1 on a
    /// problem.
    Check {
        /// Identities expiring within this are a problem (e.g. `6h`).
        #[arg(long, default_value = "6h")]
        identity_margin: String,
        /// Served certificates (`certs/`) expiring within this are a
        /// problem.
        #[arg(long, default_value = "14d")]
        cert_margin: String,
    },
    /// Prints a shell completion script: `meshctl completion bash >
    /// /etc/bash_completion.d/meshctl`.
    Completion { shell: clap_complete::Shell },
    /// Delete an object.
    Delete {
        kind: String,
        name: String,
        /// Even when other objects still refer to it.
        #[arg(long)]
        force: bool,
    },
    /// Every gateway's and sidecar's applied revision.
    Status {
        /// Wait until every gateway is in sync (e.g. `10s`); exit 1 if not.
        #[arg(long)]
        wait: Option<String>,
    },
    /// The live service graph: every caller -> destination edge with its
    /// rate, error rate, p50/p99 and the tiers that carried it, refreshed
    /// every `--interval` seconds (`-n` times; default: until interrupted).
    Top {
        /// The window the rates are over, seconds (1-600).
        #[arg(long, default_value_t = 60)]
        window: u64,
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Refresh this many times, then exit.
        #[arg(short = 'n', long)]
        iterations: Option<u64>,
    },
    /// Each service's traffic in the window: calls in and out, rate, error
    /// rate, p99; declared destinations never called and calls not
    /// declared.
    Stat {
        #[arg(long, default_value_t = 60)]
        window: u64,
    },
    /// Which route a request would match, and why.
    Explain {
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(short = 'X', long, default_value = "GET")]
        method: String,
        /// `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value = "mesh")]
        scope: String,
    },
    /// The change log, newest first.
    History {
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Put an object back as it was at a recorded version.
    Rollback {
        kind: String,
        name: String,
        version: i64,
    },
    /// Suggest `allowed_callers` for each service from the
    /// `destinations` the other services declare; `--apply` sets them on
    /// the services that have none (existing lists are left alone).
    SuggestCallers {
        #[arg(long)]
        apply: bool,
    },
    /// The mesh CA on files: a root and an issuer, and certificates for
    /// gateways and sidecars (`mesh_tls` in their node configs).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Join tokens of the admin's mesh CA: a node with one obtains its
    /// identity (`mesh_tls.issuer` in its node config).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// A token for a gateway (`--gateway ID`) or a service's sidecars
    /// (`--service S --group G`); printed once, only its hash is kept.
    Create {
        #[arg(long, conflicts_with_all = ["service", "group"])]
        gateway: Option<String>,
        #[arg(long, requires = "group")]
        service: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// How long it may be used to join, seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// The tokens (never their secrets).
    List,
    /// Revoke a token: no new joins with it; with an identity's last
    /// token, its renewals stop too.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create a root and an issuer in DIR (keep root.key offline after).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        root_days: u64,
        #[arg(long, default_value_t = 365)]
        issuer_days: u64,
    },
    /// Sign a certificate for a gateway (`--gateway ID`) or a service's
    /// sidecar (`--service S --group G`) with DIR's issuer; writes
    /// OUT.crt and OUT.key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, conflicts_with_all = ["service", "group"])]
        gateway: Option<String>,
        #[arg(long, requires = "group")]
        service: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// Lifetime in hours (renew at half of it).
        #[arg(long, default_value_t = 24)]
        hours: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

/// A failure to report: the message, and the API's field problems.
struct Failure(String, Vec<String>);

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s, Vec::new())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, fields)) => {
            // An empty message: the answer is the exit status (`diff`
            // with differences), already printed.
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            for f in fields {
                eprintln!("  {f}");
            }
            ExitCode::FAILURE
        }
    }
}

struct Api {
    conn: Conn,
}

/// Where and as whom to call: the flags (or their environment
/// variables), else the context's, else the defaults.
#[derive(Debug, Default)]
struct Conn {
    server: String,
    token: Option<String>,
    cacert: Option<PathBuf>,
}

/// A context of the contexts file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Context {
    server: Option<String>,
    token_file: Option<PathBuf>,
    cacert: Option<PathBuf>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Contexts {
    current: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Context>,
}

fn read_token(path: &Path) -> Result<String, Failure> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(format!("token file {}: empty", path.display()).into());
    }
    Ok(token)
}

impl Conn {
    fn resolve(cli: &Cli) -> Result<Conn, Failure> {
        let path = cli.contexts.clone().or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".config/meshgate/contexts.yaml"))
        });
        let file: Contexts = match &path {
            Some(p) if p.exists() => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            Some(p) if cli.contexts.is_some() => {
                return Err(format!("{}: no such contexts file", p.display()).into())
            }
            _ => Contexts::default(),
        };
        let name = cli.context.clone().or(file.current.clone());
        let ctx = match &name {
            Some(n) => file.contexts.get(n).ok_or_else(|| {
                let known: Vec<&String> = file.contexts.keys().collect();
                Failure(
                    format!("no context {n} in the contexts file (known: {known:?})"),
                    Vec::new(),
                )
            })?,
            None => &Context::default(),
        };
        let token = match (&cli.token, &cli.token_file, &ctx.token_file) {
            (Some(t), _, _) => Some(t.clone()),
            (None, Some(f), _) | (None, None, Some(f)) => Some(read_token(f)?),
            _ => None,
        };
        Ok(Conn {
            server: cli
                .server
                .clone()
                .or(ctx.server.clone())
                .unwrap_or_else(|| "http://127.0.0.1:9901".into()),
            token,
            cacert: cli.cacert.clone().or(ctx.cacert.clone()),
        })
    }
}

impl Api {
    /// Every object of `kind` (matching `selector`), page by page.
    async fn list(&self, kind: &str, selector: Option<&str>) -> Result<Vec<Value>, Failure> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = format!("{kind}?limit=1000");
            if let Some(s) = selector {
                q.push_str(&format!("&selector={s}"));
            }
            if let Some(a) = &after {
                q.push_str(&format!("&after={a}"));
            }
            let page = self.call(Method::GET, &q, None).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return Ok(items),
            }
        }
    }

    /// `/status` with every node, page by page (the counts and `in_sync`
    /// of every page cover them all).
    async fn status(&self) -> Result<Value, Failure> {
        let mut v = self.call(Method::GET, "status?limit=1000", None).await?;
        let mut next = v["next"].as_str().map(str::to_string);
        while let Some(after) = next {
            let q = format!("status?limit=1000&after={after}");
            let page = self.call(Method::GET, &q, None).await?;
            let more = page["nodes"].as_array().cloned().unwrap_or_default();
            if let Some(nodes) = v["nodes"].as_array_mut() {
                nodes.extend(more);
            }
            next = page["next"].as_str().map(str::to_string);
        }
        v["next"] = Value::Null;
        Ok(v)
    }

    /// Calls `/api/v1/<path>`; an error status becomes a [`Failure`] with
    /// the API's message and field paths.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}/api/v1/{path}", self.conn.server.trim_end_matches('/'));
        let mut headers = Vec::new();
        if let Some(t) = &self.conn.token {
            headers.push(("authorization", format!("Bearer {t}")));
        }
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let tls = meshgate_admin::tls::client_config(self.conn.cacert.as_deref())?;
        let (status, bytes) = client::request(Some(&tls), method, &url, &headers, body).await?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let msg = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{status}"));
        let mut fields: Vec<String> = v["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e["field"].as_str().unwrap_or(""),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if fields.is_empty() {
            if let Some(f) = v["field"].as_str() {
                fields.push(format!("field: {f}"));
            }
        }
        Err(Failure(format!("{} ({})", msg, status.as_u16()), fields))
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    if let Cmd::Completion { shell } = &cli.cmd {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        clap_complete::generate(*shell, &mut cmd, "meshctl", &mut std::io::stdout());
        return Ok(());
    }
    let api = Api {
        conn: Conn::resolve(cli)?,
    };
    match &cli.cmd {
        Cmd::Completion { .. } => {}
        Cmd::Check {
            identity_margin,
            cert_margin,
        } => check(&api, identity_margin, cert_margin).await?,
        Cmd::Ca { cmd } => ca(cmd)?,
        Cmd::Token { cmd } => match cmd {
            TokenCmd::Create {
                gateway,
                service,
                group,
                ttl,
            } => {
                let identity = identity_path(gateway, service, group)?;
                let body = json!({"identity": identity, "ttl_s": ttl});
                let v = api.call(Method::POST, "join-tokens", Some(body)).await?;
                print(cli, &v, |v| format!("{}\n", s(&v["token"])));
            }
            TokenCmd::List => {
                let v = api.call(Method::GET, "join-tokens", None).await?;
                print(cli, &v, |v| {
                    let rows = v["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| {
                            let expires = t["expires_at_ms"].as_i64().unwrap_or(0) / 1000;
                            vec![
                                s(&t["name"]),
                                s(&t["identity"]),
                                meshgate_config::tls::rfc3339(expires),
                                s(&t["created_by"]),
                            ]
                        })
                        .collect();
                    table(&["NAME", "IDENTITY", "JOIN UNTIL", "CREATED BY"], rows)
                });
            }
            TokenCmd::Delete { name } => {
                api.call(Method::DELETE, &format!("join-tokens/{name}"), None)
                    .await?;
                println!("join token {name} deleted");
            }
        },
        Cmd::SuggestCallers { apply } => {
            let services = api.list("services", None).await?;
            let suggested = suggest_callers(&services);
            let mut out = serde_json::Map::new();
            for (svc, (callers, has_list)) in &suggested {
                let applied = if *apply && !has_list {
                    let patch = json!({ "allowed_callers": callers });
                    api.call(Method::PATCH, &format!("services/{svc}"), Some(patch))
                        .await?;
                    true
                } else {
                    false
                };
                out.insert(
                    svc.clone(),
                    json!({"allowed_callers": callers, "has_list": has_list, "applied": applied}),
                );
            }
            let v = Value::Object(out);
            print(cli, &v, |v| {
                let mut text = String::new();
                for (svc, o) in v.as_object().into_iter().flatten() {
                    let note = match (o["applied"] == true, o["has_list"] == true) {
                        (true, _) => " (applied)",
                        (false, true) => " (has its own list: left alone)",
                        _ => "",
                    };
                    let callers: Vec<String> = o["allowed_callers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(s)
                        .collect();
                    text.push_str(&format!(
                        "{svc}: allowed_callers: [{}]{note}\n",
                        callers.join(", ")
                    ));
                }
                text
            });
        }
        Cmd::Get {
            kind,
            name,
            selector,
        } => {
            let kinds: Vec<String> = match kind.as_str() {
                "all" if name.is_some() => {
                    return Err("get all takes no name".to_string().into());
                }
                "all" => Kind::CONFIG
                    .iter()
                    .map(|k| k.as_str().to_string())
                    .collect(),
                k => vec![k.to_string()],
            };
            let v = match name {
                Some(n) => api.call(Method::GET, &format!("{kind}/{n}"), None).await?,
                None => {
                    let mut items = Vec::new();
                    for k in &kinds {
                        items.extend(api.list(k, selector.as_deref()).await?);
                    }
                    json!({ "items": items })
                }
            };
            if cli.output == Output::Yaml {
                // The config file format: `apply -f` takes it back as is.
                print!(
                    "{}",
                    serde_yaml::to_string(&as_files(&v)).unwrap_or_default()
                );
                return Ok(());
            }
            print(cli, &v, |v| {
                let rows: Vec<Vec<String>> = match v["items"].as_array() {
                    Some(items) => items.iter().map(object_row).collect(),
                    None => vec![object_row(v)],
                };
                table(&["KIND", "NAME", "VERSION", "SUMMARY"], rows)
            });
        }
        Cmd::Apply {
            files,
            wait,
            prune,
            selector,
        } => {
            let objects = load(files)?;
            let prune = selector.as_deref().filter(|_| *prune);
            let changes = diff(&api, &objects, prune).await?;
            let items: Vec<Value> = changes
                .iter()
                .filter_map(|c| match c.change {
                    Change::Unchanged => None,
                    Change::Delete => Some(json!({"op": "delete", "kind": c.key.kind.as_str(), "name": c.key.name})),
                    _ => Some(json!({"op": "put", "kind": c.key.kind.as_str(), "name": c.key.name, "spec": c.spec})),
                })
                .collect();
            if items.is_empty() {
                print(
                    cli,
                    &json!({"items": [], "unchanged": changes.len()}),
                    |_| format!("no changes ({} objects unchanged)\n", changes.len()),
                );
                return Ok(());
            }
            let path = match wait {
                Some(w) => format!("batch?wait={w}"),
                None => "batch".to_string(),
            };
            let v = api
                .call(Method::POST, &path, Some(json!({ "items": items })))
                .await
                .map_err(|Failure(msg, fields)| {
                    if fields.is_empty() {
                        return Failure(msg, fields);
                    }
                    // Every problem is listed below, named by object (the
                    // server's paths start `items[i]`).
                    let status = msg.rsplit_once(" (").map_or("", |(_, s)| s);
                    Failure(
                        format!("the batch was refused, nothing was applied ({status}"),
                        fields.iter().map(|f| name_item(f, &items)).collect(),
                    )
                })?;
            print(cli, &v, |v| {
                let mut out = table(
                    &["KIND", "NAME", "RESULT", "VERSION"],
                    v["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|i| {
                            vec![
                                s(&i["kind"]),
                                s(&i["name"]),
                                s(&i["result"]),
                                s(&i["version"]),
                            ]
                        })
                        .collect(),
                );
                let unchanged = changes.len() - items.len();
                if unchanged > 0 {
                    out.push_str(&format!("{unchanged} unchanged\n"));
                }
                if let Some(p) = v.get("propagation") {
                    out.push_str(&propagation_line(p));
                }
                out
            });
            if v["propagation"]["complete"] == false {
                return Err(Failure(
                    "applied, but not every gateway had it by the deadline".into(),
                    Vec::new(),
                ));
            }
        }
        Cmd::Diff {
            files,
            prune,
            selector,
        } => {
            let objects = load(files)?;
            let prune = selector.as_deref().filter(|_| *prune);
            let changes = diff(&api, &objects, prune).await?;
            let v = json!(changes
                .iter()
                .map(|c| json!({"kind": c.key.kind.as_str(), "name": c.key.name, "change": c.change.as_str(), "fields": c.fields}))
                .collect::<Vec<_>>());
            print(cli, &v, |_| {
                let mut out = String::new();
                for c in changes.iter().filter(|c| c.change != Change::Unchanged) {
                    out.push_str(&format!("{} {}\n", c.change.sign(), c.key));
                    for f in &c.fields {
                        out.push_str(&format!("    {f}\n"));
                    }
                }
                let same = changes
                    .iter()
                    .filter(|c| c.change == Change::Unchanged)
                    .count();
                if out.is_empty() {
                    out.push_str("no changes\n");
                }
                out.push_str(&format!("{same} unchanged\n"));
                out
            });
            // As `diff` and `kubectl diff`: 1 when there are differences.
            if changes.iter().any(|c| c.change != Change::Unchanged) {
                return Err(Failure(String::new(), Vec::new()));
            }
        }
        Cmd::Delete { kind, name, force } => {
            let path = format!("{kind}/{name}{}", if *force { "?force=true" } else { "" });
            let v = api.call(Method::DELETE, &path, None).await?;
            print(cli, &v, |v| {
                format!(
                    "deleted {} (revision {})\n",
                    s(&v["deleted"]),
                    s(&v["revision"])
                )
            });
        }
        Cmd::Status { wait } => {
            let deadline = wait
                .as_deref()
                .map(|w| {
                    meshgate_admin::api::parse_duration(w)
                        .map_err(|e| Failure(e.message, Vec::new()))
                })
                .transpose()?
                .map(|d| Instant::now() + d);
            let v = loop {
                let v = api.status().await?;
                let gateways_in_sync = v["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["kind"] == "gateway")
                    .all(|n| n["in_sync"] == true);
                match deadline {
                    Some(d) if !gateways_in_sync && Instant::now() < d => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Some(_) if !gateways_in_sync => {
                        print(cli, &v, status_table);
                        return Err(Failure("not every gateway is in sync".into(), Vec::new()));
                    }
                    _ => break v,
                }
            };
            print(cli, &v, status_table);
        }
        Cmd::Top {
            window,
            interval,
            iterations,
        } => {
            let (window, interval, iterations) = (*window, *interval, *iterations);
            let mut n = 0;
            loop {
                let v = api
                    .call(Method::GET, &format!("topology?window_s={window}"), None)
                    .await?;
                if matches!(cli.output, Output::Table) && iterations != Some(1) {
                    // Clear the screen between refreshes, as top does.
                    print!("\x1b[2J\x1b[H");
                }
                print(cli, &v, top_table);
                n += 1;
                if iterations.is_some_and(|max| n >= max) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(interval.max(1))).await;
            }
        }
        Cmd::Stat { window } => {
            let v = api
                .call(Method::GET, &format!("topology?window_s={window}"), None)
                .await?;
            print(cli, &v, stat_table);
        }
        Cmd::Explain {
            host,
            path,
            method,
            headers,
            scope,
        } => {
            let mut h = BTreeMap::new();
            for line in headers {
                let (k, v) = line
                    .split_once(':')
                    .ok_or_else(|| format!("--header {line:?}: expected `name: value`"))?;
                h.insert(k.trim().to_string(), v.trim().to_string());
            }
            let body =
                json!({"scope": scope, "host": host, "path": path, "method": method, "headers": h});
            let v = api.call(Method::POST, "explain", Some(body)).await?;
            print(cli, &v, explain_text);
        }
        Cmd::History { kind, name, limit } => {
            let mut q = format!("history?limit={limit}");
            if let Some(k) = kind {
                q.push_str(&format!("&kind={k}"));
            }
            if let Some(n) = name {
                q.push_str(&format!("&name={n}"));
            }
            let v = api.call(Method::GET, &q, None).await?;
            print(cli, &v, |v| {
                let mut rows = Vec::new();
                for i in v["items"].as_array().into_iter().flatten() {
                    for c in i["changes"].as_array().into_iter().flatten() {
                        rows.push(vec![
                            s(&i["version"]),
                            s(&i["by"]),
                            format!("{}/{}", s(&c["kind"]), s(&c["name"])),
                            s(&c["op"]),
                        ]);
                    }
                }
                table(&["VERSION", "BY", "OBJECT", "CHANGE"], rows)
            });
        }
        Cmd::Rollback {
            kind,
            name,
            version,
        } => {
            let body = json!({"kind": kind, "name": name, "version": version});
            let v = api.call(Method::POST, "rollback", Some(body)).await?;
            print(cli, &v, |v| match v.get("deleted") {
                Some(d) => format!("rolled back: deleted {}\n", s(d)),
                None => format!(
                    "rolled back {kind}/{name} to its version {version}: now version {}\n",
                    s(&v["version"])
                ),
            });
        }
    }
    Ok(())
}

// === files and diffs ===

/// Objects of the files, by key.
fn load(files: &[PathBuf]) -> Result<BTreeMap<Key, Value>, Failure> {
    let mut paths = Vec::new();
    for f in files {
        if f.as_os_str() == "-" {
            paths.push(f.clone());
        } else if f.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(f)
                .map_err(|e| format!("{}: {e}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            inside.sort();
            paths.extend(inside);
        } else {
            paths.push(f.clone());
        }
    }
    // Every problem of every file, then every invalid object: all listed,
    // none sent.
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for p in paths {
        match load_file(&p) {
            Ok(objects) => {
                for (key, spec) in objects {
                    if out.insert(key.clone(), spec).is_some() {
                        problems.push(format!("{}: {key} is defined twice", p.display()));
                    }
                }
            }
            Err(Failure(msg, _)) => problems.push(msg),
        }
    }
    for (key, spec) in &out {
        if let Err(Failure(_, fields)) = normalise(key, spec) {
            problems.extend(fields.into_iter().map(|f| format!("{key}: {f}")));
        }
    }
    if !problems.is_empty() {
        return Err(Failure(
            format!(
                "{} problem(s) in the files; nothing was applied",
                problems.len()
            ),
            problems,
        ));
    }
    Ok(out)
}

fn load_file(p: &Path) -> Result<Vec<(Key, Value)>, Failure> {
    let text = if p.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}"))?
    } else {
        std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?
    };
    let doc: BTreeMap<String, Value> =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut out = Vec::new();
    for (kind, objects) in doc {
        if kind == "revision" {
            continue;
        }
        let k = Kind::parse(&kind)
            .filter(|k| k.is_config())
            .ok_or_else(|| {
                format!(
                    "{}: {kind}: not a config kind (certs, groups, consumers, services, routes, tcp_routes)",
                    p.display()
                )
            })?;
        let Value::Object(map) = objects else {
            return Err(format!("{}: {kind}: expected a map of name → spec", p.display()).into());
        };
        for (name, spec) in map {
            out.push((Key::new(k, name), spec));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Create,
    Update,
    Unchanged,
    /// On the server, matching the prune selector, not in the files.
    Delete,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Update => "update",
            Change::Unchanged => "unchanged",
            Change::Delete => "delete",
        }
    }
    fn sign(self) -> char {
        match self {
            Change::Create => '+',
            Change::Update => '~',
            Change::Unchanged => '=',
            Change::Delete => '-',
        }
    }
}

struct Planned {
    key: Key,
    spec: Value,
    change: Change,
    fields: Vec<String>,
}

/// The server's objects of `kinds` (matching `selector`), by key: one
/// list call per kind, not one GET per object.
async fn server_objects(
    api: &Api,
    kinds: &BTreeSet<Kind>,
    selector: Option<&str>,
) -> Result<BTreeMap<Key, Value>, Failure> {
    let mut out = BTreeMap::new();
    for kind in kinds {
        for item in api.list(kind.as_str(), selector).await? {
            if let Some(name) = item["name"].as_str() {
                out.insert(Key::new(*kind, name.to_string()), item["spec"].clone());
            }
        }
    }
    Ok(out)
}

/// Each file object against the server's, in apply order (kinds in
/// dependency order; services referring to other services after them);
/// with `prune` (a selector), then the server's objects it matches that
/// the files do not hold, to delete, in the reverse order.
async fn diff(
    api: &Api,
    objects: &BTreeMap<Key, Value>,
    prune: Option<&str>,
) -> Result<Vec<Planned>, Failure> {
    let kinds: BTreeSet<Kind> = objects.keys().map(|k| k.kind).collect();
    let server = server_objects(api, &kinds, None).await?;
    let mut out = Vec::new();
    for key in apply_order(objects) {
        let spec = &objects[&key];
        // Compare normalised forms (defaults filled in), as the server stores,
        // and as GET shows them (a certificate without its private key: a
        // new key comes with a new certificate).
        let mut local = normalise(&key, spec)?;
        meshgate_config::validate::public_spec(key.kind, &mut local);
        let (change, fields) = match server.get(&key) {
            None => (Change::Create, Vec::new()),
            Some(r) => {
                let mut fields = Vec::new();
                field_diff("", r, &local, &mut fields);
                if fields.is_empty() {
                    (Change::Unchanged, fields)
                } else {
                    (Change::Update, fields)
                }
            }
        };
        out.push(Planned {
            key,
            spec: spec.clone(),
            change,
            fields,
        });
    }
    if let Some(selector) = prune {
        let all: BTreeSet<Kind> = Kind::CONFIG.into_iter().collect();
        let gone: BTreeMap<Key, Value> = server_objects(api, &all, Some(selector))
            .await?
            .into_iter()
            .filter(|(k, _)| !objects.contains_key(k))
            .collect();
        for key in apply_order(&gone).into_iter().rev() {
            out.push(Planned {
                key,
                spec: Value::Null,
                change: Change::Delete,
                fields: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// API answers (one object, or `items`) in the config file format:
/// `{kind: {name: spec}}`.
fn as_files(v: &Value) -> BTreeMap<String, BTreeMap<String, Value>> {
    let one = [v.clone()];
    let items = v["items"].as_array().map_or(&one[..], Vec::as_slice);
    let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for o in items {
        if let (Some(k), Some(n)) = (o["kind"].as_str(), o["name"].as_str()) {
            out.entry(k.to_string())
                .or_default()
                .insert(n.to_string(), o["spec"].clone());
        }
    }
    out
}

/// `items[3].endpoints[0]: …` from a batch answer as
/// `services/orders: endpoints[0]: …` (or as the message alone when it
/// already names the object).
fn name_item(line: &str, items: &[Value]) -> String {
    let named = || {
        let (path, message) = line.split_once(": ")?;
        let (i, sub) = path.strip_prefix("items[")?.split_once(']')?;
        let item = items.get(i.parse::<usize>().ok()?)?;
        let key = format!("{}/{}", s(&item["kind"]), s(&item["name"]));
        if message.starts_with(&format!("{key}: ")) {
            return Some(message.to_string());
        }
        Some(match sub.trim_start_matches('.') {
            "" => format!("{key}: {message}"),
            sub => format!("{key}: {sub}: {message}"),
        })
    };
    named().unwrap_or_else(|| line.to_string())
}

fn normalise(key: &Key, spec: &Value) -> Result<Value, Failure> {
    let bytes = serde_json::to_vec(spec).expect("json encodes");
    let obj = Object::decode(key, &bytes).map_err(|e| {
        Failure(
            format!("{key} is invalid"),
            e.errors
                .iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect(),
        )
    })?;
    Ok(serde_json::from_slice(&obj.to_json()).unwrap_or(Value::Null))
}

fn apply_order(objects: &BTreeMap<Key, Value>) -> Vec<Key> {
    let mut order = Vec::new();
    for kind in Kind::CONFIG {
        let mut pending: Vec<&Key> = objects.keys().filter(|k| k.kind == kind).collect();
        if kind != Kind::Services {
            order.extend(pending.into_iter().cloned());
            continue;
        }
        // A service goes after the services of the file it refers to.
        let mut placed: BTreeSet<String> = BTreeSet::new();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|k| {
                let ready = service_refs(&objects[*k]).iter().all(|r| {
                    *r == k.name
                        || placed.contains(r)
                        || !objects.contains_key(&Key::new(Kind::Services, r.as_str()))
                });
                if ready {
                    placed.insert(k.name.clone());
                    order.push((*k).clone());
                }
                !ready
            });
            if pending.len() == before {
                // A cycle: the rest in name order; the server says why.
                order.extend(pending.drain(..).cloned());
            }
        }
    }
    order
}

/// Services a service spec refers to (fallback, destinations).
fn service_refs(spec: &Value) -> Vec<String> {
    let mut refs: Vec<String> = spec["fallback"]
        .as_str()
        .map(str::to_string)
        .into_iter()
        .collect();
    for d in spec["destinations"].as_array().into_iter().flatten() {
        if let Some(s) = d["service"].as_str() {
            refs.push(s.to_string());
        }
    }
    refs
}

/// The fields that differ, as `path: old → new`.
fn field_diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                field_diff(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if old == new => {}
        _ => out.push(format!("{path}: {old} → {new}")),
    }
}

// === output ===

fn print(cli: &Cli, v: &Value, human: impl FnOnce(&Value) -> String) {
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_yaml::to_string(v).unwrap_or_default()),
        Output::Table => print!("{}", human(v)),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut l = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn object_row(o: &Value) -> Vec<String> {
    let spec = &o["spec"];
    let summary = match o["kind"].as_str() {
        Some("services") => format!(
            "{} endpoint(s)",
            spec["endpoints"].as_array().map_or(0, Vec::len)
        ),
        Some("routes") => format!(
            "{} → {}",
            s(&spec["scope"]),
            spec["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| s(&b["service"]))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some("tcp_routes") => format!("port {} → {}", s(&spec["port"]), s(&spec["service"])),
        Some("consumers") => format!(
            "{} API key(s), {} JWT key(s)",
            spec["api_keys"].as_array().map_or(0, Vec::len),
            spec["jwt"]["keys"].as_array().map_or(0, Vec::len)
        ),
        _ => s(&spec["description"]),
    };
    vec![s(&o["kind"]), s(&o["name"]), s(&o["version"]), summary]
}

/// `meshctl top`: one row per caller -> destination edge, busiest first.
fn top_table(v: &Value) -> String {
    let mut edges: Vec<&Value> = v["edges"].as_array().into_iter().flatten().collect();
    edges.sort_by(|a, b| {
        let r = |e: &Value| e["rps"].as_f64().unwrap_or(0.0);
        r(b).total_cmp(&r(a))
    });
    let mut out = format!(
        "last {} s (observed {} s), {} edge(s)\n",
        s(&v["window_s"]),
        s(&v["observed_s"]),
        edges.len()
    );
    out.push_str(&table(
        &[
            "CALLER",
            "DESTINATION",
            "RPS",
            "ERRORS",
            "P50 MS",
            "P99 MS",
            "TIERS",
            "FLAG",
        ],
        edges
            .iter()
            .map(|e| {
                let tiers: Vec<String> = e["tiers"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(t, r)| format!("{t}:{}", s(r)))
                    .collect();
                let flag = if e["undeclared"] == true {
                    "undeclared"
                } else {
                    ""
                };
                vec![
                    s(&e["caller"]),
                    s(&e["destination"]),
                    s(&e["rps"]),
                    format!("{:.1}%", e["error_rate"].as_f64().unwrap_or(0.0) * 100.0),
                    s(&e["p50_ms"]),
                    s(&e["p99_ms"]),
                    tiers.join(" "),
                    flag.into(),
                ]
            })
            .collect(),
    ));
    for u in v["unused"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "declared, not called in the window: {} -> {}\n",
            s(&u["caller"]),
            s(&u["destination"])
        ));
    }
    out
}

/// `meshctl stat`: one row per service, its calls in and out.
fn stat_table(v: &Value) -> String {
    let edges: Vec<&Value> = v["edges"].as_array().into_iter().flatten().collect();
    let rows = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|svc| {
            let inbound: Vec<&&Value> = edges.iter().filter(|e| e["destination"] == svc).collect();
            let rps: f64 = inbound
                .iter()
                .map(|e| e["rps"].as_f64().unwrap_or(0.0))
                .sum();
            let errors: f64 = inbound
                .iter()
                .map(|e| e["rps"].as_f64().unwrap_or(0.0) * e["error_rate"].as_f64().unwrap_or(0.0))
                .sum();
            let p99 = inbound
                .iter()
                .filter_map(|e| e["p99_ms"].as_f64())
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            let out = edges.iter().filter(|e| e["caller"] == svc).count();
            let undeclared = edges
                .iter()
                .filter(|e| e["caller"] == svc && e["undeclared"] == true)
                .count();
            let unused = v["unused"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|u| u["caller"] == svc)
                .count();
            vec![
                svc.to_string(),
                format!("{rps:.3}"),
                if rps > 0.0 {
                    format!("{:.1}%", errors / rps * 100.0)
                } else {
                    "-".into()
                },
                p99.map_or("-".into(), |p| format!("{p:.3}")),
                inbound.len().to_string(),
                out.to_string(),
                undeclared.to_string(),
                unused.to_string(),
            ]
        })
        .collect();
    let mut out = format!("last {} s\n", s(&v["window_s"]));
    out.push_str(&table(
        &[
            "SERVICE",
            "RPS IN",
            "ERRORS",
            "P99 MS",
            "CALLERS",
            "CALLS",
            "UNDECLARED",
            "UNUSED",
        ],
        rows,
    ));
    out
}

fn status_table(v: &Value) -> String {
    let mut out = format!(
        "store revision {}, newest config version {}, in sync: {}\n",
        s(&v["store"]["revision"]),
        s(&v["config_revision"]),
        s(&v["in_sync"])
    );
    let nodes = v["nodes"].as_array().map(Vec::as_slice).unwrap_or_default();
    out.push_str(&table(
        &[
            "NODE", "KIND", "APPLIED", "LAG", "IN SYNC", "POLICY", "REJECTED",
        ],
        nodes
            .iter()
            .map(|n| {
                vec![
                    s(&n["id"]),
                    s(&n["kind"]),
                    s(&n["applied_revision"]),
                    s(&n["lag_revisions"]),
                    s(&n["in_sync"]),
                    s(&n["policy"]),
                    node_rejections(n).len().to_string(),
                ]
            })
            .collect(),
    ));
    // Each refusal, with the node, the object and the reason.
    for n in nodes {
        for r in node_rejections(n) {
            out.push_str(&format!(
                "{} rejects {} (version {}): {}\n",
                s(&n["id"]),
                s(&r["object"]),
                s(&r["version"]),
                s(&r["error"])
            ));
        }
    }
    out
}

/// The refusals a node reports in `/status`.
fn node_rejections(n: &Value) -> &[Value] {
    n["rejected"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn propagation_line(p: &Value) -> String {
    format!(
        "propagation: {} (applied: {}; pending: {})\n",
        if p["complete"] == true {
            "complete"
        } else {
            "incomplete"
        },
        p["applied"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        p["pending"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
    )
}

fn explain_text(v: &Value) -> String {
    let r = &v["result"];
    let mut out = format!(
        "{} {} {} ({} scope, gateway {})\n",
        s(&v["method"]),
        s(&v["host"]),
        s(&v["path"]),
        s(&v["scope"]),
        s(&v["gateway"])
    );
    match r["route"].as_str() {
        Some(route) => out.push_str(&format!("matched route {route}\n")),
        None => out.push_str(&format!("no route: {}\n", s(&r["why"]))),
    }
    for b in r["backends"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  → {} ({}%)\n",
            s(&b["service"]),
            s(&b["share_percent"])
        ));
    }
    for c in v["candidates"].as_array().into_iter().flatten() {
        out.push_str(&format!("  {}: {}", s(&c["route"]), s(&c["verdict"])));
        let reasons: Vec<String> = c["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        if !reasons.is_empty() {
            out.push_str(&format!(" ({})", reasons.join("; ")));
        }
        out.push('\n');
    }
    out
}

/// `meshctl ca`: the mesh CA on files (no admin API involved).
fn ca(cmd: &CaCmd) -> Result<(), Failure> {
    let days = |d: u64| std::time::Duration::from_secs(d.saturating_mul(86_400));
    match cmd {
        CaCmd::Init {
            trust_domain,
            out,
            root_days,
            issuer_days,
        } => {
            meshgate_admin::ca::init(out, trust_domain, days(*root_days), days(*issuer_days))?;
            println!(
                "created the mesh CA in {dir}: root.crt, issuer.crt, bundle.pem (the trust bundle), \
                 root.key and issuer.key (mode 0600; move root.key offline)",
                dir = out.display()
            );
        }
        CaCmd::Issue {
            dir,
            gateway,
            service,
            group,
            hours,
            out,
        } => {
            let path = identity_path(gateway, service, group)?;
            let hours = std::time::Duration::from_secs(hours.saturating_mul(3600));
            let id = meshgate_admin::ca::issue(dir, &path, hours, out)?;
            println!("issued {id}: {o}.crt, {o}.key", o = out.display());
        }
    }
    Ok(())
}

/// The identity path `--gateway ID` or `--service S --group G` names.
fn identity_path(
    gateway: &Option<String>,
    service: &Option<String>,
    group: &Option<String>,
) -> Result<String, Failure> {
    let path = match (gateway, service, group) {
        (Some(id), None, None) => format!("gateway/{id}"),
        (None, Some(svc), Some(g)) => format!("group/{g}/service/{svc}"),
        _ => {
            return Err(Failure(
                "give --gateway ID, or --service S --group G".into(),
                Vec::new(),
            ))
        }
    };
    if !meshgate_admin::issuer::valid_identity(&path) {
        return Err(Failure(format!("{path:?}: not valid names"), Vec::new()));
    }
    Ok(path)
}

/// For each service some other service declares as a destination: the
/// callers (`group/<g>/service/<svc>`, or the bare name of a service
/// without a group), and whether it already has `allowed_callers`.
fn suggest_callers(items: &[Value]) -> BTreeMap<String, (Vec<String>, bool)> {
    let mut out: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for caller in items {
        let name = s(&caller["name"]);
        let rule = match caller["spec"]["group"].as_str() {
            Some(g) => format!("group/{g}/service/{name}"),
            None => name.clone(),
        };
        for d in caller["spec"]["destinations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let dest = s(&d["service"]);
            let has_list = items
                .iter()
                .find(|i| i["name"] == dest.as_str())
                .is_some_and(|i| !i["spec"]["allowed_callers"].is_null());
            let entry = out.entry(dest).or_insert_with(|| (Vec::new(), has_list));
            if !entry.0.contains(&rule) {
                entry.0.push(rule.clone());
            }
        }
    }
    for (callers, _) in out.values_mut() {
        callers.sort();
    }
    out
}

/// `meshctl check`: every problem an operator looks for first, each on a
/// line; a [`Failure`] (exit 1) when any.
async fn check(api: &Api, identity_margin: &str, cert_margin: &str) -> Result<(), Failure> {
    let margin = |s: &str| {
        meshgate_admin::api::parse_span(s).ok_or_else(|| {
            Failure(
                format!("{s}: not a duration (e.g. 90s, 6h, 14d)"),
                Vec::new(),
            )
        })
    };
    let (id_margin, cert_margin) = (margin(identity_margin)?, margin(cert_margin)?);
    let mut lines: Vec<(bool, String)> = Vec::new();
    // The admin API, and etcd behind it (`/status` reads the store).
    let status = match api.status().await {
        Ok(v) => {
            lines.push((true, format!("admin API {} answers", api.conn.server)));
            lines.push((
                true,
                format!("etcd reachable (revision {})", s(&v["store"]["revision"])),
            ));
            Some(v)
        }
        Err(Failure(msg, _)) if msg.ends_with("(503)") => {
            lines.push((true, format!("admin API {} answers", api.conn.server)));
            lines.push((false, format!("etcd unreachable: {msg}")));
            None
        }
        Err(Failure(msg, _)) => {
            lines.push((false, format!("admin API {}: {msg}", api.conn.server)));
            None
        }
    };
    let now_ms = meshgate_config::model::now_ms() as i64;
    if let Some(v) = &status {
        let nodes: Vec<&Value> = v["nodes"].as_array().into_iter().flatten().collect();
        let gateways: Vec<&&Value> = nodes.iter().filter(|n| n["kind"] == "gateway").collect();
        let lagging: Vec<String> = gateways
            .iter()
            .filter(|n| n["in_sync"] != true)
            .map(|n| format!("{} ({} behind)", s(&n["id"]), s(&n["lag_revisions"])))
            .collect();
        match (gateways.len(), lagging.is_empty()) {
            (0, _) => lines.push((false, "no live gateway".into())),
            (n, true) => lines.push((true, format!("{n} gateway(s), all in sync"))),
            (n, false) => lines.push((
                false,
                format!(
                    "{} of {n} gateway(s) not in sync: {}",
                    lagging.len(),
                    lagging.join(", ")
                ),
            )),
        }
        let sidecars: Vec<&&Value> = nodes.iter().filter(|n| n["kind"] == "sidecar").collect();
        let stale: Vec<String> = sidecars
            .iter()
            .filter(|n| n["policy"] != "fresh")
            .map(|n| format!("{} ({})", s(&n["id"]), s(&n["policy"])))
            .collect();
        match stale.is_empty() {
            true => lines.push((
                true,
                format!("{} sidecar(s), every policy fresh", sidecars.len()),
            )),
            false => lines.push((
                false,
                format!("sidecar policy not fresh: {}", stale.join(", ")),
            )),
        }
        for n in &nodes {
            let refused = node_rejections(n);
            if !refused.is_empty() {
                lines.push((
                    false,
                    format!("{} refuses {} config object(s)", s(&n["id"]), refused.len()),
                ));
            }
            if let Some(at) = n["identity"]["expires_at_ms"].as_i64() {
                let left = (at - now_ms) / 1000;
                if left < id_margin.as_secs() as i64 {
                    lines.push((
                        false,
                        format!(
                            "{}: mesh identity expires in {left} s (not renewed?)",
                            s(&n["id"])
                        ),
                    ));
                }
            }
        }
        let with_identity = nodes.iter().filter(|n| n["identity"].is_object()).count();
        if with_identity > 0 {
            lines.push((true, format!("{with_identity} mesh identit(ies) checked")));
        }
    }
    if status.is_some() {
        let certs = api.list("certs", None).await?;
        let fmt = time::format_description::well_known::Rfc3339;
        let mut close = Vec::new();
        for c in &certs {
            let info = if c["info"].is_object() {
                &c["info"]
            } else {
                &c["spec"]["info"]
            };
            let Some(after) = info["not_after"].as_str() else {
                continue;
            };
            let Ok(t) = time::OffsetDateTime::parse(after, &fmt) else {
                continue;
            };
            let left = t.unix_timestamp() - now_ms / 1000;
            if left < cert_margin.as_secs() as i64 {
                close.push(format!("{} (not after {after})", s(&c["name"])));
            }
        }
        match close.is_empty() {
            true => lines.push((
                true,
                format!("{} served certificate(s), none expiring soon", certs.len()),
            )),
            false => lines.push((
                false,
                format!("certificates expiring soon: {}", close.join(", ")),
            )),
        }
    }
    let problems = lines.iter().filter(|(ok, _)| !ok).count();
    for (ok, line) in &lines {
        println!("{} {line}", if *ok { "ok  " } else { "FAIL" });
    }
    if problems > 0 {
        return Err(Failure(format!("{problems} problem(s)"), Vec::new()));
    }
    Ok(())
}
