//! `chorus loadgen --grabbers N`: a red-packet rain under load (SPEC Q7).
//!
//! N grabbing clients join one room (ramped at `--connect-rate`); then the run creates a
//! rain in it through the admin API (`--admin-url`, default the first WebSocket URL's host), which starts a second later and lasts
//! `--duration` seconds. Each grabber taps `--grab-rate` times per second, each tap with
//! its own request id, sent with the probability of the throttle factor the server pushed
//! (`rain.start`, or the latest answer). Reported: grabs served per second (every answer),
//! grants per second, the latency of each (send to answer), the answers by result, and the
//! rain's audit at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chorus_protocol::{Event, GrabResult, RainGrabRequest};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    connect_and_join, latency_report, LatencyReport, LoadgenArgs, Plan, Stats, LATENCY_US_MAX,
};
use crate::client::ClientEvent;

/// Most grabbing clients one run may start.
pub const GRABBERS_MAX: u32 = 100_000;
/// Highest tap rate per grabber, per second.
pub const GRAB_RATE_MAX: f64 = 100.0;

/// The rain run's report.
#[derive(Debug, Clone, Serialize)]
pub struct RainLoadReport {
    /// The rain.
    pub rain_id: String,
    /// Grabbers that connected and joined.
    pub grabbers_connected: u64,
    /// The throttle factor pushed at the start (1 if none arrived).
    pub throttle: f64,
    /// Taps the grabbers made, sent or not.
    pub taps: u64,
    /// Grabs sent (taps the throttle let through).
    pub grabs_sent: u64,
    /// Grabs answered, any result.
    pub grabs_answered: u64,
    /// Answered per second over the tapping.
    pub grabs_served_per_sec: f64,
    /// Granted per second over the tapping.
    pub grants_per_sec: f64,
    /// Answers by result (`granted`, `none_left`, `cap_reached`, `throttled`, …, `error`).
    pub results: std::collections::BTreeMap<String, u64>,
    /// Every answer's latency.
    pub latency: LatencyReport,
    /// Granted answers' latency (they wait for the majority copy).
    pub granted_latency: LatencyReport,
    /// Seconds of tapping.
    pub tapping_secs: f64,
    /// The server's audit of the rain after the run (`GET /admin/rain/audit`).
    pub audit: serde_json::Value,
}

struct GrabStats {
    taps: AtomicU64,
    sent: AtomicU64,
    answered: AtomicU64,
    granted: AtomicU64,
    results: Mutex<std::collections::BTreeMap<String, u64>>,
    latency: Mutex<Histogram<u64>>,
    granted_latency: Mutex<Histogram<u64>>,
    throttle_millis: AtomicU64,
}

impl GrabStats {
    fn new() -> anyhow::Result<Self> {
        Ok(GrabStats {
            taps: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            results: Mutex::default(),
            latency: Mutex::new(Histogram::new_with_max(LATENCY_US_MAX, 3)?),
            granted_latency: Mutex::new(Histogram::new_with_max(LATENCY_US_MAX, 3)?),
            throttle_millis: AtomicU64::new(1_000),
        })
    }

    fn result(&self, name: &str) {
        let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        *results.entry(name.to_string()).or_default() += 1;
    }
}

/// Validates the rain options.
pub fn validate(args: &LoadgenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.grabbers <= GRABBERS_MAX,
        "--grabbers must be at most {GRABBERS_MAX}"
    );
    anyhow::ensure!(
        args.grab_rate > 0.0 && args.grab_rate <= GRAB_RATE_MAX,
        "--grab-rate must be above 0 and at most {GRAB_RATE_MAX}"
    );
    Ok(())
}

/// Runs the rain scenario in `plan.room_id` (the host is in it).
pub async fn run(
    args: &LoadgenArgs,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
) -> anyhow::Result<RainLoadReport> {
    let grab_stats = Arc::new(GrabStats::new()?);
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let start_gate = CancellationToken::new();
    let joined = Arc::new(AtomicU64::new(0));
    let settled = Arc::new(AtomicU64::new(0));
    let rain_id = Arc::new(Mutex::new(String::new()));

    let ramp_started = Instant::now();
    super::ramp(args.grabbers, args.connect_rate, |index| {
        tracker.spawn(grabber(
            index,
            plan.clone(),
            stats.clone(),
            grab_stats.clone(),
            args.grab_rate,
            start_gate.clone(),
            stop.clone(),
            joined.clone(),
            settled.clone(),
            rain_id.clone(),
        ));
    })
    .await;
    super::wait_until(Instant::now() + Duration::from_secs(60), || {
        settled.load(Ordering::Relaxed) >= u64::from(args.grabbers)
    })
    .await;
    eprintln!(
        "loadgen: {} of {} grabbers joined in {:.1} s",
        joined.load(Ordering::Relaxed),
        args.grabbers,
        ramp_started.elapsed().as_secs_f64()
    );

    let admin_url = super::admin_url(args)?;
    let created = crate::admin_cli::call(
        &admin_url,
        &args.admin_token,
        hyper::Method::POST,
        &format!(
            "/admin/rain?room={}&total={}&count={}&cap={}&start_in_ms=1000&duration_ms={}",
            plan.room_id,
            args.rain_total,
            args.rain_packets,
            args.rain_cap,
            args.duration * 1000
        ),
        None,
    )
    .await
    .context("cannot create the rain")?;
    let id = created["rain_id"]
        .as_str()
        .context("the rain create answer has no rain_id")?
        .to_string();
    *rain_id.lock().unwrap_or_else(|e| e.into_inner()) = id.clone();
    eprintln!(
        "loadgen: rain {id} starts in 1 s and lasts {} s",
        args.duration
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let tapping_started = Instant::now();
    start_gate.cancel();
    let progress = {
        let grab_stats = grab_stats.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let answered = grab_stats.answered.load(Ordering::Relaxed);
                eprintln!(
                    "loadgen: {} grabs/s answered, {} granted in all",
                    answered - last,
                    grab_stats.granted.load(Ordering::Relaxed)
                );
                last = answered;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop.cancel();
    let tapping_secs = tapping_started.elapsed().as_secs_f64();
    tracker.close();
    let _ = tokio::time::timeout(
        Duration::from_secs(super::SHUTDOWN_WAIT_SECS + super::REQUEST_TIMEOUT_MS / 1000),
        tracker.wait(),
    )
    .await;
    let _ = progress.await;
    // The rain ends at its end; the audit then covers the refund too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let audit = crate::admin_cli::call(
        &admin_url,
        &args.admin_token,
        hyper::Method::GET,
        &format!("/admin/rain/audit?id={id}"),
        None,
    )
    .await
    .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}));
    let answered = grab_stats.answered.load(Ordering::Relaxed);
    let granted = grab_stats.granted.load(Ordering::Relaxed);
    let latency = latency_report(&grab_stats.latency.lock().unwrap_or_else(|e| e.into_inner()));
    let granted_latency = latency_report(
        &grab_stats
            .granted_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    let results = grab_stats
        .results
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(RainLoadReport {
        rain_id: id,
        grabbers_connected: joined.load(Ordering::Relaxed),
        throttle: grab_stats.throttle_millis.load(Ordering::Relaxed) as f64 / 1000.0,
        taps: grab_stats.taps.load(Ordering::Relaxed),
        grabs_sent: grab_stats.sent.load(Ordering::Relaxed),
        grabs_answered: answered,
        grabs_served_per_sec: answered as f64 / tapping_secs.max(0.001),
        grants_per_sec: granted as f64 / tapping_secs.max(0.001),
        results,
        latency,
        granted_latency,
        tapping_secs,
        audit,
    })
}

#[allow(clippy::too_many_arguments)]
async fn grabber(
    index: usize,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    grab_stats: Arc<GrabStats>,
    rate: f64,
    start_gate: CancellationToken,
    stop: CancellationToken,
    joined: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
    rain_id: Arc<Mutex<String>>,
) {
    let user = format!("lg-{}-g{index}", plan.run_id);
    let client = tokio::select! {
        _ = stop.cancelled() => None,
        client = connect_and_join(&plan, &user, index, &stats, "grabber") => client,
    };
    settled.fetch_add(1, Ordering::Relaxed);
    let Some(mut client) = client else { return };
    joined.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = stop.cancelled() => { client.close().await; return }
        _ = start_gate.cancelled() => {}
    }
    let rain = rain_id.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut throttle = 1.0f64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Spread the grabbers' ticks over one period.
    tokio::time::sleep(Duration::from_secs_f64(rand::random::<f64>() / rate)).await;
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        while let Some(event) = client.try_next_event() {
            if let ClientEvent::Notification {
                event: Event::RainStart(start),
                ..
            } = &event
            {
                throttle = start.throttle.clamp(0.001, 1.0);
                grab_stats
                    .throttle_millis
                    .store((throttle * 1000.0) as u64, Ordering::Relaxed);
            }
        }
        grab_stats.taps.fetch_add(1, Ordering::Relaxed);
        if throttle < 1.0 && rand::random::<f64>() >= throttle {
            continue;
        }
        n += 1;
        grab_stats.sent.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let answer = client
            .request(RainGrabRequest {
                rain_id: rain.clone(),
                request_id: format!("{user}-{n}"),
            })
            .await;
        let micros = sent.elapsed().as_micros() as u64;
        match answer {
            Ok(answer) => {
                grab_stats.answered.fetch_add(1, Ordering::Relaxed);
                throttle = answer.throttle.clamp(0.001, 1.0);
                let _ = grab_stats
                    .latency
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(micros.min(LATENCY_US_MAX));
                let name = serde_json::to_value(answer.result)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                grab_stats.result(&name);
                if answer.result == GrabResult::Granted {
                    grab_stats.granted.fetch_add(1, Ordering::Relaxed);
                    let _ = grab_stats
                        .granted_latency
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(micros.min(LATENCY_US_MAX));
                }
            }
            Err(error) => {
                grab_stats.result("error");
                stats.error("grab", &error);
            }
        }
    }
    client.close().await;
}
