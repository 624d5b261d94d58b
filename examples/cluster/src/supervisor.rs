//! The supervisor: owns the listening sockets, starts and restarts worker processes, runs
//! rolling restarts and the staged shutdown, and serves cluster-wide metrics.
//!
//! # Sockets that outlive workers
//!
//! The supervisor binds one `SO_REUSEPORT` socket per worker slot and never closes it while
//! serving. A worker process is the current executable re-run with a hidden
//! `--internal-worker` argument; it inherits a duplicate of its slot's socket and one end of
//! a control socket pair. When a worker dies or is replaced, connections the kernel queued on
//! its slot's socket stay in the backlog until the next worker of that slot accepts them:
//! a restart loses none (closing an `SO_REUSEPORT` socket would reset them).
//!
//! Descriptors are made inheritable by `dup` (which clears close-on-exec) right before the
//! spawn and closed right after it. All spawns happen on the supervisor's single runtime
//! thread, so no other child can inherit them.
//!
//! # Lifecycle
//!
//! - **Crash** (any exit the supervisor did not ask for): the slot's worker is restarted after
//!   `--restart-backoff`, doubling per crash of that slot inside `--crash-window`, at most
//!   `--restart-backoff-max`. The `--crash-limit`th crash inside the window stops the server
//!   with exit code 1.
//! - **SIGHUP**: slot by slot, a new worker is started on the same socket; once it reports
//!   ready, the old one drains gently (see `conn`). A new worker that dies or is not ready
//!   within `--ready-timeout` abandons the restart and the old workers keep serving. A SIGHUP
//!   during a rolling restart queues one more.
//! - **SIGTERM/SIGINT**: every worker drains immediately (see `conn`) within
//!   `--shutdown-grace`, the supervisor closes its sockets, and exits 0 once all workers have
//!   exited; workers still alive 2 s after the grace are killed. A second signal kills them
//!   at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::{Admin, Cli, WorkerArgs};
use crate::control::{ToSupervisor, ToWorker};
use crate::metrics::{self, ClusterMetrics, Snapshot};
use crate::server;

/// Extra time after the grace period before workers are killed.
const KILL_MARGIN: Duration = Duration::from_secs(2);

/// How long `GET /metrics` waits for fresh worker snapshots before answering with the last
/// ones it has.
const SCRAPE_WAIT: Duration = Duration::from_millis(250);

#[derive(Debug)]
enum Event {
    Message {
        id: u64,
        msg: ToSupervisor,
    },
    Exited {
        id: u64,
        status: std::io::Result<ExitStatus>,
    },
    RestartDue {
        slot: usize,
    },
    ReadyTimeout {
        id: u64,
    },
    /// `GET /metrics`: ask every ready worker for a snapshot; answer when all replied.
    Scrape(oneshot::Sender<()>),
    Hup,
    Stop,
    KillDue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Serving its slot (or starting to).
    Current,
    /// Started by a rolling restart, not yet ready.
    Pending,
    /// Told to drain; its exit is expected.
    Draining,
}

#[derive(Debug)]
struct Worker {
    slot: usize,
    pid: Option<u32>,
    role: Role,
    ready: bool,
    /// Counted in `cluster_workers`.
    counted: bool,
    to_worker: mpsc::UnboundedSender<ToWorker>,
    kill: Option<oneshot::Sender<()>>,
}

#[derive(Debug)]
struct Slot {
    /// Closed when the supervisor stops.
    listener: Option<std::net::TcpListener>,
    current: Option<u64>,
    generation: u64,
    crashes: VecDeque<Instant>,
}

#[derive(Debug)]
struct Rolling {
    slot: usize,
    pending: Option<u64>,
}

struct Supervisor {
    cli: Cli,
    exe: PathBuf,
    args: Vec<OsString>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    slots: Vec<Slot>,
    workers: BTreeMap<u64, Worker>,
    next_id: u64,
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<ClusterMetrics>,
    rolling: Option<Rolling>,
    hup_queued: bool,
    stopping: bool,
    exit_code: i32,
    announced: bool,
    admin_stop: CancellationToken,
    /// Scrapes waiting for these workers' snapshots.
    scrapes: Vec<(BTreeSet<u64>, oneshot::Sender<()>)>,
}

/// Runs the supervisor until it is stopped; returns the process exit code.
pub(crate) fn run(cli: Cli, workers: usize) -> anyhow::Result<i32> {
    // The path is resolved once: a rolling restart re-runs whatever binary is at this path
    // now, which is how a new build is deployed without downtime.
    let exe = std::env::current_exe().context("cannot locate the current executable")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();

    server::ensure_port_free(cli.listen)?;
    let mut slots = Vec::with_capacity(workers);
    let mut addr = cli.listen;
    for _ in 0..workers {
        // The first bind resolves port 0; the others join the same port.
        let listener = server::bind_listener(addr, cli.backlog)?;
        addr = listener.local_addr()?;
        slots.push(Slot {
            listener: Some(listener),
            current: None,
            generation: 0,
            crashes: VecDeque::new(),
        });
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let metrics = Arc::new(ClusterMetrics::new());
        let admin_stop = CancellationToken::new();
        let (events, mut rx) = mpsc::unbounded_channel();
        let admin_addr = match cli.admin {
            Admin::Off => None,
            Admin::On(admin) => {
                let listener = tokio::net::TcpListener::bind(admin)
                    .await
                    .with_context(|| format!("cannot bind the admin address {admin}"))?;
                let admin_addr = listener.local_addr()?;
                let (m, events) = (metrics.clone(), events.clone());
                let render = move || {
                    let (m, events) = (m.clone(), events.clone());
                    async move {
                        let (tx, rx) = oneshot::channel();
                        if events.send(Event::Scrape(tx)).is_ok() {
                            let _ = tokio::time::timeout(SCRAPE_WAIT, rx).await;
                        }
                        metrics::encode_registry(&m.registry)
                    }
                };
                tokio::spawn(server::admin_server(listener, render, admin_stop.clone()));
                Some(admin_addr)
            }
        };
        spawn_signal_forwarders(events.clone())?;
        let mut sup = Supervisor {
            cli,
            exe,
            args,
            addr,
            admin_addr,
            slots,
            workers: BTreeMap::new(),
            next_id: 1,
            events,
            metrics,
            rolling: None,
            hup_queued: false,
            stopping: false,
            exit_code: 0,
            announced: false,
            admin_stop,
            scrapes: Vec::new(),
        };
        for slot in 0..sup.slots.len() {
            let id = sup.spawn(slot, Role::Current)?;
            sup.slots[slot].current = Some(id);
        }
        while let Some(event) = rx.recv().await {
            sup.handle(event);
            if sup.stopping && sup.workers.is_empty() {
                break;
            }
        }
        sup.admin_stop.cancel();
        tracing::info!(exit_code = sup.exit_code, "supervisor stopped");
        anyhow::Ok(sup.exit_code)
    })
}

fn spawn_signal_forwarders(events: mpsc::UnboundedSender<Event>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                Some(()) = term.recv() => { tracing::info!("SIGTERM received"); Event::Stop }
                Some(()) = int.recv() => { tracing::info!("SIGINT received"); Event::Stop }
                Some(()) = hup.recv() => { tracing::info!("SIGHUP received"); Event::Hup }
                else => break,
            };
            if events.send(event).is_err() {
                break;
            }
        }
    });
    Ok(())
}

impl Supervisor {
    /// Starts a worker process for `slot`.
    fn spawn(&mut self, slot: usize, role: Role) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let s = &mut self.slots[slot];
        s.generation += 1;
        let listener = s.listener.as_ref().context("the slot's socket is closed")?;
        // `dup` clears close-on-exec: these two are inherited by the child (and, since every
        // spawn runs on this one thread, only by it) and closed here right after the spawn.
        let listen_fd = rustix::io::dup(listener)?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let control_fd = rustix::io::dup(&theirs)?;
        let worker_args = WorkerArgs {
            slot,
            generation: s.generation,
            listen_fd: listen_fd.as_raw_fd(),
            control_fd: control_fd.as_raw_fd(),
        };
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&self.args)
            .arg("--internal-worker")
            .arg(worker_args.to_string())
            .stdin(Stdio::null())
            // A terminal's Ctrl-C reaches only the supervisor, which coordinates the drain.
            .process_group(0)
            .kill_on_drop(true);
        let spawned = cmd.spawn();
        drop((listen_fd, control_fd, theirs));
        let mut child = spawned.with_context(|| format!("cannot start {}", self.exe.display()))?;
        let pid = child.id();

        ours.set_nonblocking(true)?;
        let (mut rd, mut wr) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let events = self.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = ToSupervisor::read(&mut rd).await {
                if events.send(Event::Message { id, msg }).is_err() {
                    break;
                }
            }
        });
        let (to_worker, mut to_worker_rx) = mpsc::unbounded_channel::<ToWorker>();
        tokio::spawn(async move {
            while let Some(msg) = to_worker_rx.recv().await {
                if msg.write(&mut wr).await.is_err() {
                    break;
                }
            }
            // Dropping `wr` here closes our half: the worker sees EOF and drains.
        });
        let (kill, kill_rx) = oneshot::channel::<()>();
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                Ok(()) = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = events.send(Event::Exited { id, status });
        });
        tracing::debug!(slot, id, pid, ?role, "worker started");
        self.workers.insert(
            id,
            Worker {
                slot,
                pid,
                role,
                ready: false,
                counted: false,
                to_worker,
                kill: Some(kill),
            },
        );
        Ok(id)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Message { id, msg } => match msg {
                ToSupervisor::Ready => self.on_ready(id),
                ToSupervisor::Metrics(text) => {
                    if self.workers.contains_key(&id) {
                        self.metrics
                            .collector
                            .aggregator
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .update(id, Snapshot::parse(&text));
                    }
                    self.scrape_answered(id);
                }
            },
            Event::Scrape(reply) => {
                let ready: BTreeSet<u64> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.ready)
                    .map(|(id, _)| *id)
                    .collect();
                if ready.is_empty() {
                    let _ = reply.send(());
                    return;
                }
                for id in &ready {
                    let _ = self.workers[id].to_worker.send(ToWorker::Scrape);
                }
                self.scrapes.push((ready, reply));
            }
            Event::Exited { id, status } => self.on_exit(id, status),
            Event::RestartDue { slot } => {
                if !self.stopping && self.slots[slot].current.is_none() {
                    match self.spawn(slot, Role::Current) {
                        Ok(id) => {
                            self.slots[slot].current = Some(id);
                            self.metrics.restarts.inc();
                        }
                        Err(e) => {
                            tracing::error!(slot, error = %format!("{e:#}"), "cannot restart worker");
                            self.crash(slot, "spawn failed".to_owned());
                        }
                    }
                }
            }
            Event::ReadyTimeout { id } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    if w.role == Role::Pending && !w.ready {
                        tracing::error!(
                            slot = w.slot,
                            pid = w.pid,
                            "new worker not ready within --ready-timeout: abandoning the rolling restart"
                        );
                        w.role = Role::Draining;
                        if let Some(kill) = w.kill.take() {
                            let _ = kill.send(());
                        }
                        self.rolling = None;
                        self.hup_queued = false;
                    }
                }
            }
            Event::Hup => {
                if self.stopping {
                    return;
                }
                if self.rolling.is_some() {
                    tracing::info!("rolling restart in progress: queued another one");
                    self.hup_queued = true;
                } else {
                    self.start_rolling();
                }
            }
            Event::Stop => {
                if self.stopping {
                    tracing::warn!("second stop signal: killing the workers now");
                    self.kill_all();
                } else {
                    self.stop(0);
                }
            }
            Event::KillDue => {
                if !self.workers.is_empty() {
                    tracing::warn!(
                        workers = self.workers.len(),
                        "workers still running after the grace period: killing them"
                    );
                    self.kill_all();
                }
            }
        }
    }

    fn on_ready(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.ready = true;
        let (slot, role, pid) = (w.slot, w.role, w.pid);
        match role {
            Role::Current => {
                if !w.counted {
                    w.counted = true;
                    self.metrics.workers.inc();
                }
                tracing::debug!(slot, pid, "worker ready");
            }
            Role::Pending => {
                w.role = Role::Current;
                w.counted = true;
                self.metrics.workers.inc();
                if let Some(old) = self.slots[slot].current.replace(id) {
                    self.retire(old, true);
                }
                tracing::info!(
                    slot,
                    pid,
                    "rolling restart: new worker serving, old one draining"
                );
                self.advance_rolling();
            }
            Role::Draining => {}
        }
        if !self.announced
            && self.slots.iter().all(|s| {
                s.current
                    .is_some_and(|c| self.workers.get(&c).is_some_and(|w| w.ready))
            })
        {
            self.announced = true;
            tracing::info!(
                addr = %self.addr,
                admin = %self.admin_addr.map_or("off".to_owned(), |a| a.to_string()),
                workers = self.slots.len(),
                pid = std::process::id(),
                "listening"
            );
        }
    }

    /// Tells worker `id` to drain (a planned exit).
    fn retire(&mut self, id: u64, gentle: bool) {
        if let Some(w) = self.workers.get_mut(&id) {
            if w.counted {
                w.counted = false;
                self.metrics.workers.dec();
            }
            w.role = Role::Draining;
            let _ = w.to_worker.send(ToWorker::Drain { gentle });
        }
    }

    /// Worker `id` sent a snapshot (or exited): answer the scrapes that waited only for it.
    fn scrape_answered(&mut self, id: u64) {
        if self.scrapes.is_empty() {
            return;
        }
        for (waiting, _) in &mut self.scrapes {
            waiting.remove(&id);
        }
        let (done, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.scrapes)
            .into_iter()
            .partition(|(waiting, reply)| waiting.is_empty() || reply.is_closed());
        self.scrapes = pending;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }

    fn on_exit(&mut self, id: u64, status: std::io::Result<ExitStatus>) {
        self.scrape_answered(id);
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.metrics
            .collector
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retire(id);
        if w.counted {
            self.metrics.workers.dec();
        }
        let status = match &status {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let slot = w.slot;
        match w.role {
            Role::Draining => {
                tracing::info!(slot, pid = w.pid, %status, "worker exited after draining");
            }
            _ if self.stopping => {
                tracing::info!(slot, pid = w.pid, %status, "worker exited");
            }
            Role::Pending => {
                tracing::error!(
                    slot,
                    pid = w.pid,
                    %status,
                    "new worker exited before it was ready: abandoning the rolling restart"
                );
                self.rolling = None;
                self.hup_queued = false;
            }
            Role::Current => {
                if self.slots[slot].current == Some(id) {
                    self.slots[slot].current = None;
                }
                self.crash(slot, status);
            }
        }
    }

    /// Records a crash of `slot` and schedules its restart, or stops the server when the
    /// slot is crash-looping.
    fn crash(&mut self, slot: usize, status: String) {
        let now = Instant::now();
        let window = self.cli.crash_window;
        let crashes = &mut self.slots[slot].crashes;
        crashes.push_back(now);
        while crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            crashes.pop_front();
        }
        let n = crashes.len() as u32;
        if n >= self.cli.crash_limit {
            tracing::error!(
                slot,
                crashes = n,
                window = %humantime::format_duration(window),
                last_exit = %status,
                "worker is crash-looping (--crash-limit reached): stopping the server"
            );
            self.stop(1);
            return;
        }
        let delay = self
            .cli
            .restart_backoff
            .saturating_mul(1u32 << (n - 1).min(20))
            .min(self.cli.restart_backoff_max);
        tracing::warn!(
            slot,
            %status,
            restart_in = %humantime::format_duration(delay),
            "worker exited unexpectedly"
        );
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::RestartDue { slot });
        });
    }

    fn start_rolling(&mut self) {
        tracing::info!(workers = self.slots.len(), "rolling restart started");
        self.rolling = Some(Rolling {
            slot: 0,
            pending: None,
        });
        self.spawn_pending();
    }

    fn spawn_pending(&mut self) {
        let Some(slot) = self.rolling.as_ref().map(|r| r.slot) else {
            return;
        };
        match self.spawn(slot, Role::Pending) {
            Ok(id) => {
                if let Some(r) = self.rolling.as_mut() {
                    r.pending = Some(id);
                }
                let events = self.events.clone();
                let timeout = self.cli.ready_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = events.send(Event::ReadyTimeout { id });
                });
            }
            Err(e) => {
                tracing::error!(slot, error = %format!("{e:#}"), "rolling restart abandoned: cannot start a worker");
                self.rolling = None;
                self.hup_queued = false;
            }
        }
    }

    fn advance_rolling(&mut self) {
        let Some(r) = self.rolling.as_mut() else {
            return;
        };
        r.slot += 1;
        r.pending = None;
        if r.slot < self.slots.len() {
            self.spawn_pending();
            return;
        }
        self.rolling = None;
        self.metrics.rolling_restarts.inc();
        tracing::info!("rolling restart complete");
        if std::mem::take(&mut self.hup_queued) {
            self.start_rolling();
        }
    }

    fn stop(&mut self, exit_code: i32) {
        self.stopping = true;
        self.exit_code = self.exit_code.max(exit_code);
        self.rolling = None;
        self.hup_queued = false;
        tracing::info!(
            workers = self.workers.len(),
            grace = %humantime::format_duration(self.cli.shutdown_grace),
            "stopping: draining all workers"
        );
        // Our copies of the sockets go first: once the workers have taken what is queued and
        // dropped theirs, the sockets close and new connections are refused instead of
        // waiting in a backlog nobody accepts from (closing ours last would reset whatever
        // queued after the workers' final accepts).
        for slot in &mut self.slots {
            slot.listener = None;
        }
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for id in ids {
            self.retire(id, false);
        }
        let events = self.events.clone();
        let after = self.cli.shutdown_grace + KILL_MARGIN;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = events.send(Event::KillDue);
        });
    }

    fn kill_all(&mut self) {
        for w in self.workers.values_mut() {
            if let Some(kill) = w.kill.take() {
                let _ = kill.send(());
            }
        }
    }
}
