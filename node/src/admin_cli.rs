//! `chorus admin` (the operator's client for the HTTP admin API) and `chorus ca`.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Largest admin response read, in bytes.
const ADMIN_RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Time allowed for one admin request, in ms.
const ADMIN_TIMEOUT_MS: u64 = 10_000;

/// `chorus admin` flags.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The node's HTTP address, e.g. http://127.0.0.1:7070.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Admin token. Default: the development admin token.
    #[arg(long, env = "CHORUS_ADMIN_TOKEN", hide_env_values = true, default_value = crate::config::DEV_ADMIN_TOKEN)]
    pub token: String,
    /// Print the raw JSON (also after the subcommand).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Admin subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Members, Raft leader and term, ring epoch as this node sees them.
    Status,
    /// The members.
    Nodes,
    /// Whether the node is ready (`/readyz`: an `up` member with the committed ring and a
    /// known leader). Exits 0 when ready, 1 when not (after --wait, if given).
    Ready {
        /// Keep asking until ready, at most this long (e.g. 30s); default: ask once.
        #[arg(long)]
        wait: Option<humantime::Duration>,
    },
    /// Which node owns KEY (a room id, or a full key like room/r-…).
    Where {
        /// The key.
        key: String,
    },
    /// Drain member NODE: it leaves the ring and its rooms move to the others.
    Drain {
        /// Member id.
        node: u64,
    },
    /// Remove member NODE from the cluster (drain it first). Its id is never reused.
    Remove {
        /// Member id.
        node: u64,
    },
    /// Red-packet rains (create, status, ledger, audit).
    Rain {
        /// What to do.
        #[command(subcommand)]
        command: RainCommand,
    },
    /// The same as `rain audit`.
    AuditRain {
        /// The rain id.
        rain: String,
        /// JSON lines as `chorus client grab` prints them.
        #[arg(long)]
        client_log: Vec<std::path::PathBuf>,
    },
    /// Live quiz shows (create, push a question, announce, finish, status, results).
    Quiz {
        /// What to do.
        #[command(subcommand)]
        command: QuizCommand,
    },
}

/// `chorus admin quiz` subcommands.
#[derive(Debug, Subcommand)]
pub enum QuizCommand {
    /// Create a show in a room; prints `{"quiz_id": …}`. FILE is JSON: a list of
    /// `{"text", "options": [..], "correct": INDEX}`, or `{"questions": [..],
    /// "revive_cards": {"USER": N}}`.
    Create {
        /// The room viewers watch it in.
        #[arg(long)]
        room: String,
        /// Cents the survivors split.
        #[arg(long)]
        prize: u64,
        /// The questions (JSON file).
        #[arg(long)]
        questions: PathBuf,
        /// Seconds until questions may be pushed.
        #[arg(long, default_value_t = 0.0)]
        start_in: f64,
        /// Seconds to answer each question.
        #[arg(long, default_value_t = 10.0)]
        window_secs: f64,
        /// Answer shards (default 16): more spread answers over more nodes.
        #[arg(long)]
        shards: Option<u32>,
        /// Print only the quiz id (for scripts: `QUIZ=$(chorus admin quiz create … -q)`).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Push the next question to every viewer (with its deadline).
    Push {
        /// The quiz id.
        quiz: String,
    },
    /// Announce the open question's answer (after its deadline), with the key to the
    /// sealed verdicts and the per-option counts.
    Announce {
        /// The quiz id.
        quiz: String,
    },
    /// After the last announcement: split the prize among the survivors.
    Finish {
        /// The quiz id.
        quiz: String,
    },
    /// The show's phase and counts.
    Status {
        /// The quiz id.
        quiz: String,
    },
    /// Winners and their cents (after `finish`); with `--user`, that user's history.
    Results {
        /// The quiz id.
        quiz: String,
        /// Whose history.
        #[arg(long)]
        user: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `--questions FILE` may hold.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum QuestionsFile {
    List(Vec<serde_json::Value>),
    Show {
        questions: Vec<serde_json::Value>,
        #[serde(default)]
        revive_cards: serde_json::Map<String, serde_json::Value>,
    },
}

fn check_id(what: &str, id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{what} has letters, digits, - and _ only"
    );
    Ok(())
}

/// `chorus admin rain` subcommands.
#[derive(Debug, Subcommand)]
pub enum RainCommand {
    /// Create a rain in a room; prints `{"rain_id": …}`. The amounts are split now
    /// (random, each at least 1 cent, summing to the total) from a seed stored with it.
    Create {
        /// The room.
        #[arg(long)]
        room: String,
        /// Cents in all.
        #[arg(long)]
        total: u64,
        /// Packets.
        #[arg(long)]
        count: u64,
        /// Packets one user may get.
        #[arg(long, default_value_t = 3)]
        cap: u64,
        /// Seconds until it opens.
        #[arg(long, default_value_t = 0.0)]
        start_in: f64,
        /// Seconds it stays open.
        #[arg(long)]
        duration: f64,
        /// Print only the rain id (for scripts: `RAIN=$(chorus admin rain create … -q)`).
        #[arg(long, short)]
        quiet: bool,
    },
    /// A rain's definition, split totals, and what was granted and refunded.
    Status {
        /// The rain id.
        rain: String,
    },
    /// Audit a rain from durable state: each packet granted at most once and as
    /// split, no user above the cap, granted + refunded (+ unclaimed before the end) = the
    /// total to the cent, and every grant in `--client-log` is in the ledger. Exits 1 when
    /// anything fails.
    Audit {
        /// The rain id.
        rain: String,
        /// JSON lines as `chorus client grab` prints them (`user`, `result`, `amount`):
        /// every `granted` line must be in the ledger.
        #[arg(long)]
        client_log: Vec<std::path::PathBuf>,
    },
    /// A rain's ledger: one JSON line per grant (user, amount, time), then the refund.
    Ledger {
        /// The rain id.
        rain: String,
    },
}

fn check_rain_id(rain: &str) -> anyhow::Result<()> {
    check_id("the rain id", rain)
}

/// The grants clients saw (user, cents) in `chorus client grab` output files.
fn read_client_log(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut seen = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the client log {}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON line", path.display(), number + 1))?;
            if value["result"] != "granted" {
                continue;
            }
            let (Some(user), Some(amount)) = (value["user"].as_str(), value["amount"].as_u64())
            else {
                anyhow::bail!(
                    "{}:{}: a granted line needs `user` and `amount`",
                    path.display(),
                    number + 1
                );
            };
            seen.push((user.to_string(), amount));
        }
    }
    Ok(seen)
}

/// `chorus admin rain audit` and `ledger`: read the most advanced copy and work on it
/// here.
async fn rain_local(
    args: &AdminArgs,
    rain: &str,
    audit_logs: Option<&[std::path::PathBuf]>,
) -> anyhow::Result<()> {
    check_rain_id(rain)?;
    let client_log = audit_logs.map(read_client_log).transpose()?;
    let body = call(
        &args.url,
        &args.token,
        hyper::Method::GET,
        &format!("/admin/rain/state?id={rain}"),
        None,
    )
    .await?;
    let state: chorus_actors::rain::RainState = serde_json::from_value(body["state"].clone())
        .context("the node's answer is not a rain state")?;
    let Some(client_log) = client_log else {
        for line in crate::server::rain::ledger_lines(&state) {
            println!("{line}");
        }
        return Ok(());
    };
    let report = chorus_actors::rain::audit(&state, &client_log);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "rain {rain}: {} — total {} cents, granted {} in {} packets, refunded {}, unclaimed {}; {} client grants checked",
            if report.ok { "ok" } else { "VIOLATED" },
            report.total,
            report.granted,
            report.grants,
            report.refunded,
            report.unclaimed,
            client_log.len(),
        );
        for violation in &report.violations {
            println!("  violation: {violation}");
        }
    }
    if !report.ok {
        std::process::exit(1);
    }
    Ok(())
}

/// Seconds as whole milliseconds; refuses negative, infinite or NaN values.
fn secs_to_ms(what: &str, secs: f64) -> anyhow::Result<u64> {
    anyhow::ensure!(
        secs.is_finite() && (0.0..=86_400.0 * 365.0).contains(&secs),
        "{what} must be a number of seconds between 0 and a year, not {secs}"
    );
    Ok((secs * 1000.0).round() as u64)
}

/// `chorus ca` subcommands.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CaCommand,
}

/// CA commands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA in DIR (ca.pem, ca-key.pem); every node of a cluster uses it
    /// with `serve --ca DIR`.
    Init {
        /// Directory to create it in.
        dir: PathBuf,
    },
    /// Issue one node's identity from the CA in --ca into --out: ca.pem, node.pem,
    /// node-key.pem (0600) and mesh-cookie (0600). A node started with `serve --ca OUT`
    /// uses it without seeing the CA key (k8s/: an init container runs this).
    Issue {
        /// Directory holding the CA (ca.pem, ca-key.pem).
        #[arg(long = "ca", value_name = "CA_DIR")]
        ca_dir: PathBuf,
        /// Directory to write the identity into (created if absent; must not hold a CA key).
        #[arg(long = "out", value_name = "OUT_DIR")]
        out_dir: PathBuf,
        /// The node's name (its `--node-name`; the certificate's common name).
        #[arg(long)]
        node_name: String,
        /// A DNS name or IP address peers or clients reach the node by (repeatable);
        /// localhost and 127.0.0.1 are always included. A node checks at start that its
        /// own addresses are among them.
        #[arg(long = "name", value_name = "DNS_OR_IP")]
        names: Vec<String>,
        /// Also the `tls_names` of this node config file (TOML), as the node adds them.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// Runs `chorus ca`.
pub fn run_ca(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init { dir } => {
            anyhow::ensure!(
                !dir.join(chorus_cluster::tls::CA_CERT_FILE).exists(),
                "{} already holds a CA; refusing to overwrite it",
                dir.display()
            );
            let ca = chorus_cluster::tls::CertificateAuthority::generate("Chorus cluster CA")?;
            ca.save(&dir)?;
            println!(
                "{}",
                serde_json::json!({"ca_dir": dir.display().to_string()})
            );
            Ok(())
        }
        CaCommand::Issue {
            ca_dir,
            out_dir,
            node_name,
            names,
            config,
        } => {
            use chorus_cluster::tls;
            anyhow::ensure!(
                !out_dir.join(tls::CA_KEY_FILE).exists(),
                "{} holds a CA key ({}); write an issued identity to a directory without \
                 it, since a node finding the key there would use the key instead",
                out_dir.display(),
                tls::CA_KEY_FILE
            );
            let ca = tls::CertificateAuthority::load(&ca_dir).with_context(|| {
                format!(
                    "no usable CA in {} (ca.pem and ca-key.pem; create one with `chorus ca init`)",
                    ca_dir.display()
                )
            })?;
            let config_names = match &config {
                Some(path) => crate::config::NodeConfig::from_file(path)?.tls_names,
                None => Vec::new(),
            };
            let names = identity_names(names, config_names);
            tls::issue_node_identity(&ca, &out_dir, &node_name, &names)
                .with_context(|| format!("cannot issue into {}", out_dir.display()))?;
            println!(
                "{}",
                serde_json::json!({
                    "out_dir": out_dir.display().to_string(),
                    "node_name": node_name,
                    "names": names,
                })
            );
            Ok(())
        }
    }
}

/// The names an issued certificate carries: localhost and 127.0.0.1 (as a node gives
/// itself), then `names` and `config_names`, sorted, without repeats or empty names.
fn identity_names(names: Vec<String>, config_names: Vec<String>) -> Vec<String> {
    let mut all = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    all.extend(names);
    all.extend(config_names);
    all.retain(|name| !name.trim().is_empty());
    all.sort();
    all.dedup();
    all
}

/// Calls `method path` on the node's admin API (with a JSON `body` if given); returns the
/// JSON body of the answer.
pub async fn call(
    url: &str,
    token: &str,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<serde_json::Value> {
    let (status, value) = call_any_status(url, token, method, path_and_query, body).await?;
    anyhow::ensure!(
        status.is_success(),
        "the node answered {status}: {}",
        value["error"].as_str().unwrap_or("")
    );
    Ok(value)
}

/// Like [`call`], but any HTTP status with a JSON body is an answer (e.g. `/readyz`'s 503).
///
/// # Errors
///
/// A bad URL, no connection, no answer in time, or a body that is not JSON.
pub async fn call_any_status(
    url: &str,
    token: &str,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "--url must be http://HOST:PORT"
    );
    let authority = uri
        .authority()
        .context("--url needs a host and port")?
        .to_string();
    let request = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), ADMIN_RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("the node answered {status} with a body that is not JSON"))?;
        Ok::<_, anyhow::Error>((status, value))
    };
    tokio::time::timeout(std::time::Duration::from_millis(ADMIN_TIMEOUT_MS), request)
        .await
        .with_context(|| format!("no answer from {authority} within {ADMIN_TIMEOUT_MS} ms"))?
}

/// `chorus admin ready`: asks `/readyz` until ready or `wait` has passed.
async fn ready(args: &AdminArgs, wait: Option<std::time::Duration>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
    loop {
        let answer =
            call_any_status(&args.url, &args.token, hyper::Method::GET, "/readyz", None).await;
        let last = match &answer {
            Ok((status, body)) if status.is_success() => {
                if args.json {
                    println!("{body}");
                } else {
                    println!(
                        "node {} ready: up, ring epoch {}, leader {}",
                        body["node_id"], body["ring_epoch"], body["leader"]
                    );
                }
                return Ok(());
            }
            Ok((_, body)) => format!(
                "not ready: {}",
                body["reason"].as_str().unwrap_or("no reason given")
            ),
            Err(error) => format!("{error:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            // Scripts read the node's own answer (e.g. "member") even when not ready.
            if let (true, Ok((_, body))) = (args.json, &answer) {
                println!("{body}");
            }
            anyhow::bail!("{} is {last}", args.url);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Runs `chorus admin`.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    if let AdminCommand::Ready { wait } = &args.command {
        return ready(&args, wait.map(Into::into)).await;
    }
    match &args.command {
        AdminCommand::Rain {
            command: RainCommand::Audit { rain, client_log },
        }
        | AdminCommand::AuditRain { rain, client_log } => {
            return rain_local(&args, rain, Some(client_log)).await
        }
        AdminCommand::Rain {
            command: RainCommand::Ledger { rain },
        } => return rain_local(&args, rain, None).await,
        _ => {}
    }
    let mut body = None;
    let (method, path) = match &args.command {
        AdminCommand::Status => (hyper::Method::GET, "/admin/status".to_string()),
        AdminCommand::Nodes => (hyper::Method::GET, "/admin/nodes".to_string()),
        AdminCommand::Ready { .. } => unreachable!("handled above"),
        AdminCommand::Where { key } => (hyper::Method::GET, format!("/admin/where?key={key}")),
        AdminCommand::Drain { node } => (hyper::Method::POST, format!("/admin/drain?node={node}")),
        AdminCommand::Remove { node } => {
            (hyper::Method::POST, format!("/admin/remove?node={node}"))
        }
        AdminCommand::Rain {
            command:
                RainCommand::Create {
                    room,
                    total,
                    count,
                    cap,
                    start_in,
                    duration,
                    ..
                },
        } => {
            anyhow::ensure!(
                room.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "--room must be a room id (letters, digits, - and _)"
            );
            let start_in_ms = secs_to_ms("--start-in", *start_in)?;
            let duration_ms = secs_to_ms("--duration", *duration)?;
            (
                hyper::Method::POST,
                format!(
                    "/admin/rain?room={room}&total={total}&count={count}&cap={cap}&start_in_ms={start_in_ms}&duration_ms={duration_ms}"
                ),
            )
        }
        AdminCommand::Rain {
            command: RainCommand::Status { rain },
        } => {
            check_rain_id(rain)?;
            (hyper::Method::GET, format!("/admin/rain?id={rain}"))
        }
        AdminCommand::Rain {
            command: RainCommand::Audit { .. } | RainCommand::Ledger { .. },
        }
        | AdminCommand::AuditRain { .. } => unreachable!("handled above"),
        AdminCommand::Quiz { command } => {
            let (method, path, create) = quiz_request(command)?;
            body = create;
            (method, path)
        }
    };
    let body = call(&args.url, &args.token, method, &path, body).await?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    match args.command {
        AdminCommand::Status => {
            println!(
                "node {} ({}, {}): leader {}, term {}, ring epoch {}, voters {}, learners {}, actor mesh peers {}",
                body["self"],
                body["node_name"].as_str().unwrap_or("?"),
                match body["ready"].as_bool() {
                    Some(true) => "ready".to_string(),
                    _ => format!(
                        "NOT READY: {}",
                        body["not_ready"].as_str().unwrap_or("unknown")
                    ),
                },
                body["leader"],
                body["term"],
                body["ring_epoch"],
                body["voters"],
                body["learners"],
                body["mesh_peers"],
            );
            print_members(&body["members"]);
        }
        AdminCommand::Nodes => print_members(&body),
        AdminCommand::Ready { .. } => unreachable!("handled above"),
        AdminCommand::Drain { node } => println!("draining node {node}; watch `status`"),
        AdminCommand::Remove { node } => println!("removing node {node}; watch `status`"),
        AdminCommand::Rain {
            command: RainCommand::Create { quiet: true, .. },
        } => println!("{}", body["rain_id"].as_str().unwrap_or("?")),
        // A rain is data for scripts: JSON either way.
        AdminCommand::Rain { .. } | AdminCommand::AuditRain { .. } => println!("{body}"),
        AdminCommand::Quiz {
            command: QuizCommand::Results { json: false, .. },
        } => print_quiz_results(&body),
        AdminCommand::Quiz {
            command: QuizCommand::Create { quiet: true, .. },
        } => println!("{}", body["quiz_id"].as_str().unwrap_or("?")),
        // The other quiz steps print JSON for scripts.
        AdminCommand::Quiz { .. } => println!("{body}"),
        AdminCommand::Where { .. } => println!(
            "{} → node {} ({}) at ring epoch {}",
            body["key"].as_str().unwrap_or("?"),
            body["owner"],
            body["owner_name"].as_str().unwrap_or("?"),
            body["ring_epoch"],
        ),
    }
    Ok(())
}

/// The method, path and body of a `chorus admin quiz` command.
fn quiz_request(command: &QuizCommand) -> anyhow::Result<(hyper::Method, String, Option<Vec<u8>>)> {
    Ok(match command {
        QuizCommand::Create {
            room,
            prize,
            questions,
            start_in,
            window_secs,
            shards,
            ..
        } => {
            check_id("--room", room)?;
            let text = std::fs::read(questions)
                .with_context(|| format!("cannot read {}", questions.display()))?;
            let (questions, revive_cards) = match serde_json::from_slice::<QuestionsFile>(&text)
                .with_context(|| format!("{} is not a question list", questions.display()))?
            {
                QuestionsFile::List(questions) => (questions, serde_json::Map::new()),
                QuestionsFile::Show {
                    questions,
                    revive_cards,
                } => (questions, revive_cards),
            };
            let window_ms = secs_to_ms("--window-secs", *window_secs)?;
            anyhow::ensure!(window_ms > 0, "--window-secs must be positive");
            let body = serde_json::json!({
                "room": room,
                "prize_cents": prize,
                "questions": questions,
                "revive_cards": revive_cards,
                "start_in_ms": secs_to_ms("--start-in", *start_in)?,
                "window_ms": window_ms,
                "shards": shards,
            });
            (
                hyper::Method::POST,
                "/admin/quiz".to_string(),
                Some(body.to_string().into_bytes()),
            )
        }
        QuizCommand::Push { quiz }
        | QuizCommand::Announce { quiz }
        | QuizCommand::Finish { quiz } => {
            check_id("the quiz id", quiz)?;
            let step = match command {
                QuizCommand::Push { .. } => "push",
                QuizCommand::Announce { .. } => "announce",
                _ => "finish",
            };
            (
                hyper::Method::POST,
                format!("/admin/quiz/{step}?id={quiz}"),
                None,
            )
        }
        QuizCommand::Status { quiz } => {
            check_id("the quiz id", quiz)?;
            (hyper::Method::GET, format!("/admin/quiz?id={quiz}"), None)
        }
        QuizCommand::Results { quiz, user, .. } => {
            check_id("the quiz id", quiz)?;
            let mut path = format!("/admin/quiz/results?id={quiz}");
            if let Some(user) = user {
                check_id("--user", user)?;
                path.push_str(&format!("&user={user}"));
            }
            (hyper::Method::GET, path, None)
        }
    })
}

fn print_quiz_results(body: &serde_json::Value) {
    println!(
        "quiz {} in room {}: {} winners, {} of {} cents paid{}",
        body["quiz_id"].as_str().unwrap_or("?"),
        body["room_id"].as_str().unwrap_or("?"),
        body["winners"],
        body["paid_cents"],
        body["prize_cents"],
        if body["finished"] == true {
            ""
        } else {
            " (not finished)"
        },
    );
    if let Some(amounts) = body["amounts"].as_object() {
        for (user, cents) in amounts {
            println!("  {user:<24} {cents:>12}");
        }
    }
    let user = &body["user"];
    if user.is_object() {
        println!(
            "user {}: passed {}, eliminated at {}, revived at {}, {} cents",
            user["user"].as_str().unwrap_or("?"),
            user["passed"],
            user["eliminated_at"],
            user["revived_at"],
            user["cents"],
        );
        if let Some(verdicts) = user["verdicts"].as_object() {
            for (k, verdict) in verdicts {
                println!(
                    "  question {k}: option {} {}",
                    verdict["option"],
                    verdict["verdict"].as_str().unwrap_or("?")
                );
            }
        }
    }
}

fn print_members(members: &serde_json::Value) {
    println!(
        "{:>4}  {:<12} {:<9} {:<22} {:<22} cluster",
        "id", "name", "state", "http", "quic"
    );
    for m in members.as_array().into_iter().flatten() {
        println!(
            "{:>4}  {:<12} {:<9} {:<22} {:<22} {}",
            m["id"].to_string(),
            m["name"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["http_addr"].as_str().unwrap_or("?"),
            m["quic_addr"].as_str().unwrap_or("?"),
            m["cluster_addr"].as_str().unwrap_or("?"),
        );
    }
}
