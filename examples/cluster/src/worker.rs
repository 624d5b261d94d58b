//! A serving process: a worker of the supervisor, or the single process of `--workers 0`.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::cli::{Admin, Cli, RuntimeFlavor, WorkerArgs};
use crate::conn::{DrainLevel, Settings, Signal};
use crate::control::{ToSupervisor, ToWorker};
use crate::metrics::{self, WorkerMetrics};
use crate::routes::{self, RouteConfig};
use crate::server;
use tower_backpressure::BackpressureLayer;

fn runtime(flavor: RuntimeFlavor) -> std::io::Result<tokio::runtime::Runtime> {
    match flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        RuntimeFlavor::MultiThread => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

/// The pieces every serving process shares.
struct Serving {
    signal: Arc<Signal>,
    /// Leaked once per process: the per-request path borrows it instead of counting references.
    settings: &'static Settings,
    metrics: Arc<WorkerMetrics>,
    backpressure: BackpressureLayer,
    singleflight: tower_singleflight::SingleflightLayer<routes::ExpensiveKey>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Serving {
    fn new(cli: &Cli) -> Self {
        let signal = Arc::new(Signal::default());
        let backpressure =
            routes::backpressure(cli.max_in_flight, cli.max_queued, cli.queue_timeout);
        let mut metrics = WorkerMetrics::new();
        metrics.register_backpressure(backpressure.handle());
        let singleflight = routes::singleflight_if(!cli.no_singleflight);
        metrics.register_singleflight(singleflight.stats());
        let metrics = Arc::new(metrics);
        let settings: &'static Settings = Box::leak(Box::new(Settings::new(
            cli.conn_config(),
            signal.clone(),
            metrics.clone(),
        )));
        Serving {
            signal,
            settings,
            metrics,
            backpressure,
            singleflight,
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Starts accepting on `listener`. The accept loop only ends when `stop` is cancelled;
    /// if it ends otherwise (a panic), the handle lets the process notice and exit with an
    /// error instead of living on without accepting.
    fn start(&self, cli: &Cli, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        // The one place the application stack is built; every connection clones it.
        let app = routes::app(
            RouteConfig {
                max_sleep: cli.max_sleep,
                static_files: Some(
                    tower_zerocopy::ServeDir::new(&cli.root).strip_prefix("/static"),
                ),
                max_body_size: cli.max_body_size,
            },
            tower_abort::AbortLayer::with_root(self.metrics.abort_root.clone()),
            self.metrics.work_cancelled.clone(),
            self.backpressure.clone(),
            self.singleflight.clone(),
            self.metrics.backend_calls.clone(),
        );
        let max_connections =
            crate::limits::connection_cap(cli.max_connections, crate::limits::raise_nofile_limit());
        // Carries the worker's span (slot, pid) into the task's log lines.
        tokio::spawn(
            server::accept_loop(
                listener,
                app,
                self.settings,
                max_connections,
                self.tracker.clone(),
                self.stop.clone(),
            )
            .instrument(tracing::Span::current()),
        )
    }

    /// Waits for the first drain request, or for the accept loop to die.
    async fn wait_for_drain(
        &self,
        rx: &mut mpsc::UnboundedReceiver<DrainLevel>,
        accepting: &mut tokio::task::JoinHandle<()>,
    ) -> Result<DrainLevel, anyhow::Error> {
        tokio::select! {
            level = rx.recv() => Ok(level.unwrap_or(DrainLevel::Immediate)),
            ended = accepting => {
                let why = match ended {
                    Err(e) if e.is_panic() => "it panicked".to_owned(),
                    Err(e) => e.to_string(),
                    Ok(()) => "it returned".to_owned(),
                };
                Err(anyhow::anyhow!("the accept loop stopped ({why}): exiting so this process is replaced"))
            }
        }
    }

    async fn drain(
        &self,
        first: DrainLevel,
        more: mpsc::UnboundedReceiver<DrainLevel>,
        accepting: tokio::task::JoinHandle<()>,
        cli: &Cli,
    ) {
        server::drain(
            first,
            more,
            &self.signal,
            &self.stop,
            accepting,
            &self.tracker,
            cli.shutdown_grace,
            &self.metrics.abort_root,
        )
        .await
    }
}

/// `--workers 0`: one process, no supervisor; it serves `/metrics` itself.
pub(crate) fn run_standalone(cli: Cli) -> anyhow::Result<()> {
    server::ensure_port_free(cli.listen)?;
    let std_listener = server::bind_listener(cli.listen, cli.backlog)?;
    let addr = std_listener.local_addr()?;
    let rt = runtime(RuntimeFlavor::MultiThread)?;
    rt.block_on(async move {
        let serving = Serving::new(&cli);
        let admin_addr = match cli.admin {
            Admin::Off => None,
            Admin::On(admin) => {
                let listener = tokio::net::TcpListener::bind(admin)
                    .await
                    .with_context(|| format!("cannot bind the admin address {admin}"))?;
                let admin_addr = listener.local_addr()?;
                let m = serving.metrics.clone();
                tokio::spawn(server::admin_server(
                    listener,
                    move || std::future::ready(metrics::encode_registry(&m.registry)),
                    serving.stop.clone(),
                ));
                Some(admin_addr)
            }
        };
        let mut accepting = serving.start(&cli, server::into_tokio(std_listener)?);
        let (tx, mut rx) = mpsc::unbounded_channel();
        server::spawn_signal_handlers(tx, || async {
            tracing::warn!(
                "SIGHUP ignored: rolling restarts need a supervisor (--workers 1 or more)"
            );
        })?;
        tracing::info!(
            addr = %addr,
            admin = %admin_addr.map_or("off".to_owned(), |a| a.to_string()),
            workers = 0,
            pid = std::process::id(),
            "listening (single process, no supervisor)"
        );
        let first = serving.wait_for_drain(&mut rx, &mut accepting).await;
        serving
            .drain(
                first.as_ref().copied().unwrap_or(DrainLevel::Immediate),
                rx,
                accepting,
                &cli,
            )
            .await;
        first.map(|_| ())
    })
}

/// A worker started by the supervisor with its inherited listener and control socket.
pub(crate) fn run_child(cli: Cli, args: WorkerArgs) -> anyhow::Result<()> {
    // Take the inherited descriptors before anything else opens a file.
    let listen_fd = crate::fds::take_inherited(args.listen_fd).context("listening socket")?;
    let control_fd = crate::fds::take_inherited(args.control_fd).context("control socket")?;
    let listener = checked_listener(listen_fd)?;
    let control = checked_control(control_fd)?;
    let rt = runtime(cli.worker_runtime)?;
    rt.block_on(async move {
        let serving = Serving::new(&cli);
        control.set_nonblocking(true)?;
        let (mut control_rd, mut control_wr) =
            tokio::net::UnixStream::from_std(control)?.into_split();
        let mut accepting = serving.start(&cli, server::into_tokio(listener)?);

        // Outgoing control messages go through one writer task; `None` = flush and stop.
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Option<ToSupervisor>>();
        let writer = tokio::spawn(async move {
            while let Some(Some(msg)) = out_rx.recv().await {
                if let Err(e) = msg.write(&mut control_wr).await {
                    tracing::debug!(error = %e, "control socket write failed");
                    break;
                }
            }
        });
        let _ = out_tx.send(Some(ToSupervisor::Ready));

        let (drain_tx, mut drain_rx) = mpsc::unbounded_channel();
        // Supervisor commands; end-of-file means the supervisor died: drain and exit.
        {
            let drain_tx = drain_tx.clone();
            let (scrape_tx, scrape_metrics) = (out_tx.clone(), serving.metrics.clone());
            tokio::spawn(
                async move {
                    loop {
                        match ToWorker::read(&mut control_rd).await {
                            Ok(Some(ToWorker::Scrape)) => {
                                let snapshot = ToSupervisor::Metrics(scrape_metrics.encode());
                                let _ = scrape_tx.send(Some(snapshot));
                            }
                            Ok(Some(ToWorker::Drain { gentle })) => {
                                let level = if gentle {
                                    DrainLevel::Gentle
                                } else {
                                    DrainLevel::Immediate
                                };
                                let _ = drain_tx.send(level);
                            }
                            Ok(None) | Err(_) => {
                                tracing::warn!("supervisor gone (control socket closed): draining");
                                let _ = drain_tx.send(DrainLevel::Immediate);
                                break;
                            }
                        }
                    }
                }
                .instrument(tracing::Span::current()),
            );
        }
        // Terminal signals reach only the supervisor (workers run in their own process
        // group), but an operator may signal a worker directly.
        server::spawn_signal_handlers(drain_tx, || async {
            tracing::debug!("SIGHUP ignored by a worker");
        })?;
        // Periodic metrics snapshots.
        let reporter = {
            let (m, out_tx) = (serving.metrics.clone(), out_tx.clone());
            let every = cli.metrics_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if out_tx
                        .send(Some(ToSupervisor::Metrics(m.encode())))
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };
        tracing::debug!(
            slot = args.slot,
            generation = args.generation,
            "worker ready"
        );

        let first = serving.wait_for_drain(&mut drain_rx, &mut accepting).await;
        let level = first.as_ref().copied().unwrap_or(DrainLevel::Immediate);
        serving.drain(level, drain_rx, accepting, &cli).await;
        reporter.abort();
        // Final counters, so the supervisor's totals include everything this worker served.
        let _ = out_tx.send(Some(ToSupervisor::Metrics(serving.metrics.encode())));
        let _ = out_tx.send(None);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
        // An error exit is a crash to the supervisor, which restarts this slot.
        first.map(|_| ())
    })
}

fn checked_listener(fd: OwnedFd) -> anyhow::Result<std::net::TcpListener> {
    let socket = socket2::Socket::from(fd);
    let ok = socket.r#type()? == socket2::Type::STREAM
        && socket.is_listener()?
        && socket.local_addr()?.as_socket().is_some();
    anyhow::ensure!(ok, "inherited descriptor is not a listening TCP socket");
    Ok(socket.into())
}

fn checked_control(fd: OwnedFd) -> anyhow::Result<std::os::unix::net::UnixStream> {
    let socket = socket2::Socket::from(fd);
    let ok = socket.r#type()? == socket2::Type::STREAM && socket.local_addr()?.is_unix();
    anyhow::ensure!(ok, "inherited descriptor is not a Unix stream socket");
    Ok(socket.into())
}
