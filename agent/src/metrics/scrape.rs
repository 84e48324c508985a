//! One scrape: every collector against one deadline
//! (`metrics.collector_timeout`), then node_exporter's
//! `node_scrape_collector_*` families and the agent's own metrics.
//!
//! Collectors run in turn on [`WORKERS`] thread(s) of the scraper's own that
//! share the scrape's queue (a thread per collector costs more in wake-ups
//! than most collectors take). When no collector finishes for [`PATIENCE`],
//! the running ones are presumed stuck and a fresh thread goes on with the
//! queue, so a collector stuck in the kernel fails alone. One still running
//! at the deadline is reported failed, its output dropped, and it is not
//! started again until that run returns: it costs one thread, not one per
//! scrape. Scrapes are serialized, so a run in flight when a scrape starts
//! is one that overran.
//!
//! The threads are plain std threads, not tokio's blocking pool: the
//! runtime waits for its blocking tasks when it shuts down, and a collector
//! stuck in the kernel would then keep the agent from ever exiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::agent;
use super::encode::{Encoder, Format, MetricType};
use super::node::{CollectError, Collector};
use crate::status::Status;

/// Threads that start on a scrape's queue. One: the collectors together take
/// well under a millisecond, and on a busy two-core host every extra thread
/// a scrape must wait to be scheduled on adds to the slow tail (measured
/// with bench/metrics).
const WORKERS: usize = 1;
/// No collector finishing for this long means the running ones are stuck.
const PATIENCE: Duration = Duration::from_millis(100);
/// `Worker::current` when the worker runs no collector.
const IDLE: usize = usize::MAX;

struct Slot {
    collector: Arc<dyn Collector>,
    running: AtomicBool,
    /// Whether the last run succeeded, so failures are logged when they
    /// start and end rather than at every scrape.
    healthy: AtomicBool,
}

/// A thread that runs the rounds it is sent.
struct Worker {
    rounds: mpsc::Sender<Arc<Round>>,
    /// The slot it runs now, or IDLE.
    current: Arc<AtomicUsize>,
}

type Finished = (Vec<u8>, Result<(), CollectError>, Duration);

/// One scrape's collectors: those still to start and the results so far.
/// Workers wake the scrape once, when the last result is in.
struct Round {
    queue: Mutex<VecDeque<usize>>,
    results: Mutex<Vec<Option<Finished>>>,
    finished: AtomicUsize,
    total: usize,
    all_done: tokio::sync::Notify,
    format: Format,
    deadline: Instant,
}

pub struct Scraper {
    slots: Arc<Vec<Slot>>,
    workers: Mutex<Vec<Worker>>,
    timeout: Duration,
    serial: tokio::sync::Mutex<()>,
    size_hint: AtomicUsize,
}

/// Marks a run over however it ends (a panicking collector included).
struct RunGuard<'a> {
    slot: &'a Slot,
    current: &'a AtomicUsize,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.slot.running.store(false, Ordering::Release);
        self.current.store(IDLE, Ordering::Release);
    }
}

enum Outcome {
    Done(Vec<u8>, Result<(), CollectError>),
    /// Started but not finished by the deadline.
    TimedOut,
    /// Not started by the deadline (the threads were busy or stuck).
    NotStarted,
    /// An earlier scrape's run has not returned.
    StillRunning,
}

fn run_round(slots: &[Slot], round: &Round, current: &AtomicUsize) {
    loop {
        let Some(index) = round.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
            return;
        };
        let slot = &slots[index];
        current.store(index, Ordering::Release);
        slot.running.store(true, Ordering::Release);
        let guard = RunGuard { slot, current };
        let start = Instant::now();
        let mut out = Encoder::with_buffer(Vec::with_capacity(8 * 1024), round.format);
        let result = slot.collector.collect(&mut out, round.deadline);
        let took = start.elapsed();
        // Cleared before the result is published: the scrape may end, and
        // the next begin, the moment it is, and must not see this run as
        // still going.
        drop(guard);
        round.results.lock().unwrap_or_else(|e| e.into_inner())[index] = Some((out.into_inner(), result, took));
        if round.finished.fetch_add(1, Ordering::AcqRel) + 1 == round.total {
            round.all_done.notify_one();
        }
    }
}

impl Scraper {
    pub fn new(collectors: Vec<Box<dyn Collector>>, timeout: Duration) -> Scraper {
        Scraper {
            slots: Arc::new(
                collectors
                    .into_iter()
                    .map(|c| Slot {
                        collector: Arc::from(c),
                        running: AtomicBool::new(false),
                        healthy: AtomicBool::new(true),
                    })
                    .collect(),
            ),
            workers: Mutex::new(Vec::new()),
            timeout,
            serial: tokio::sync::Mutex::new(()),
            size_hint: AtomicUsize::new(64 * 1024),
        }
    }

    /// A worker thread; it ends when its `Worker` is dropped and it has run
    /// what it was sent.
    fn spawn_worker(&self) -> Option<Worker> {
        let (rounds, incoming) = mpsc::channel::<Arc<Round>>();
        let current = Arc::new(AtomicUsize::new(IDLE));
        let (slots, running) = (self.slots.clone(), current.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-collect".into())
            .spawn(move || {
                while let Ok(round) = incoming.recv() {
                    run_round(&slots, &round, &running);
                }
            });
        match spawned {
            Ok(_) => Some(Worker { rounds, current }),
            Err(err) => {
                warn!(error = %err, "metrics: cannot start a collector thread");
                None
            }
        }
    }

    /// Hands the round to the kept workers, replacing those still inside a
    /// collector from an earlier scrape (stuck: they end once it returns).
    fn start_round(&self, round: &Arc<Round>) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| w.current.load(Ordering::Acquire) == IDLE);
        while workers.len() < WORKERS.min(round.total) {
            match self.spawn_worker() {
                Some(worker) => workers.push(worker),
                None => break,
            }
        }
        workers.retain(|w| w.rounds.send(round.clone()).is_ok());
    }

    /// A one-off worker for the rest of this round, when the others stall.
    fn add_worker(&self, round: &Arc<Round>) {
        if let Some(worker) = self.spawn_worker() {
            let _ = worker.rounds.send(round.clone());
        }
    }

    /// Runs all collectors and encodes the whole exposition.
    pub async fn scrape(&self, format: Format, status: &Status) -> Vec<u8> {
        let _serial = self.serial.lock().await;
        let started = Instant::now();
        let deadline = started + self.timeout;

        let mut outcomes: Vec<(Outcome, Duration)> = Vec::with_capacity(self.slots.len());
        let mut queue = VecDeque::with_capacity(self.slots.len());
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.running.load(Ordering::Acquire) {
                outcomes.push((Outcome::StillRunning, Duration::ZERO));
            } else {
                outcomes.push((Outcome::NotStarted, Duration::ZERO));
                queue.push_back(index);
            }
        }
        let total = queue.len();
        let round = Arc::new(Round {
            queue: Mutex::new(queue),
            results: Mutex::new((0..self.slots.len()).map(|_| None).collect()),
            finished: AtomicUsize::new(0),
            total,
            all_done: tokio::sync::Notify::new(),
            format,
            deadline,
        });
        if total > 0 {
            self.start_round(&round);
        }
        let tokio_deadline = tokio::time::Instant::from_std(deadline);
        loop {
            let progress = round.finished.load(Ordering::Acquire);
            if progress >= total {
                break;
            }
            let patience = (tokio::time::Instant::now() + PATIENCE).min(tokio_deadline);
            if tokio::time::timeout_at(patience, round.all_done.notified())
                .await
                .is_ok()
            {
                continue;
            }
            if tokio::time::Instant::now() >= tokio_deadline {
                break;
            }
            let stalled = round.finished.load(Ordering::Acquire) == progress;
            if stalled && !round.queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                self.add_worker(&round);
            }
        }
        round.queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // Taken entry by entry: a run that overran may still store its result.
        let mut finished: Vec<Option<Finished>> = round
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .map(Option::take)
            .collect();
        for (index, (slot, (outcome, took))) in self.slots.iter().zip(outcomes.iter_mut()).enumerate() {
            if let Some((bytes, result, elapsed)) = finished[index].take() {
                *outcome = Outcome::Done(bytes, result);
                *took = elapsed;
            } else if matches!(outcome, Outcome::NotStarted) && slot.running.load(Ordering::Acquire) {
                *outcome = Outcome::TimedOut;
                *took = started.elapsed();
            }
        }

        let mut out = Encoder::with_buffer(Vec::with_capacity(self.size_hint.load(Ordering::Relaxed)), format);
        let mut results = Vec::with_capacity(self.slots.len());
        for (slot, (outcome, took)) in self.slots.iter().zip(outcomes) {
            let name = slot.collector.name();
            let failure = match outcome {
                Outcome::Done(bytes, result) => {
                    out.append(&bytes);
                    result
                        .err()
                        .map(|e| (matches!(e, CollectError::NoData(_)), e.to_string()))
                }
                Outcome::TimedOut => Some((
                    false,
                    format!(
                        "did not finish within {}; not run again until it returns",
                        humantime::format_duration(self.timeout)
                    ),
                )),
                Outcome::NotStarted => Some((false, "not started before the deadline".to_string())),
                Outcome::StillRunning => Some((false, "an earlier run has not returned yet".to_string())),
            };
            self.log_transition(slot, name, failure.as_ref());
            results.push((name, took, failure.is_none()));
        }

        out.family(
            "node_scrape_collector_duration_seconds",
            "node_exporter: Duration of a collector scrape.",
            MetricType::Gauge,
        );
        for (name, took, _) in &results {
            out.sample(
                "node_scrape_collector_duration_seconds",
                &[("collector", name)],
                took.as_secs_f64(),
            );
        }
        out.family(
            "node_scrape_collector_success",
            "node_exporter: Whether a collector succeeded.",
            MetricType::Gauge,
        );
        for (name, _, ok) in &results {
            out.sample_u64("node_scrape_collector_success", &[("collector", name)], u64::from(*ok));
        }
        agent::encode(status, &mut out);
        out.finish();
        let body = out.into_inner();
        self.size_hint.store(body.len() + body.len() / 8, Ordering::Relaxed);
        body
    }

    fn log_transition(&self, slot: &Slot, name: &str, failure: Option<&(bool, String)>) {
        let was_healthy = slot.healthy.swap(failure.is_none(), Ordering::Relaxed);
        match (was_healthy, failure) {
            (true, Some((true, reason))) => debug!(collector = name, "collector has no data: {reason}"),
            (true, Some((false, reason))) => warn!(collector = name, "collector failed: {reason}"),
            (false, None) => info!(collector = name, "collector works again"),
            _ => {}
        }
    }
}
