//! roomcast-bench: runs benchmark scenarios against real `roomcast serve`
//! nodes and a real `redis-server` it starts itself, on loopback, and prints
//! one table (optionally JSON). Re-executes itself as load-generator workers
//! (`worker`) and as the floor probe (`floor`). See docs/performance.md.

mod common;
mod floor;
mod poller;
mod procs;
mod publish;
mod redis_publish;
mod scenarios;
mod worker;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "roomcast benchmark tool (loopback only, bounded, cleans up after itself)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
enum Cmd {
    /// Run scenarios: idle, connect-storm, fanout, floor, broadcast, sweep, floor-sweep,
    /// redis-publish, cluster
    /// (default: the standard set, everything but cluster).
    Run(Opts),
    /// Internal: a load-generator worker process.
    Worker {
        #[arg(long)]
        spec: String,
    },
    /// Internal: the floor probe process.
    Floor {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        rooms: usize,
        #[arg(long, value_enum, default_value = "write")]
        io: floor::FloorIo,
    },
}

#[derive(Parser, Clone, Debug)]
pub struct Opts {
    /// Scenarios to run, in this order.
    pub scenarios: Vec<String>,
    /// The server binary (copied into the run directory before use).
    #[arg(long, default_value = "target/release/roomcast")]
    pub server_bin: PathBuf,
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Write every row (and the machine) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// fanout/broadcast/sweep: connections, rooms and nodes.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// fanout, floor and broadcast: target deliveries per second.
    #[arg(long, default_value_t = 100_000.0)]
    pub rate: f64,
    /// Measured seconds per fanout/broadcast/floor step.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// sweep: target deliveries/s per step (comma-separated).
    #[arg(
        long,
        default_value = "50000,100000,150000,200000,250000,300000",
        value_delimiter = ','
    )]
    pub sweep: Vec<f64>,
    /// sweep: measured seconds per step.
    #[arg(long, default_value_t = 5.0)]
    pub sweep_secs: f64,
    /// redis-publish: publishes/s per step (comma-separated), `--sweep-secs` each.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    pub publish_rates: Vec<f64>,
    /// redis-publish: connections subscribed to every room's channel, each
    /// standing in for a node with members in every room.
    #[arg(long, default_value_t = 2)]
    pub publish_subscribers: u64,
    /// idle and connect-storm: connections to one node.
    #[arg(long, default_value_t = 15_000)]
    pub idle_conns: usize,
    /// connect-storm: connections being established at once, per worker.
    #[arg(long, default_value_t = 256)]
    pub storm_concurrency: usize,
    /// cluster: nodes, connections, rooms, target deliveries/s, seconds.
    #[arg(long, default_value_t = 3)]
    pub cluster_nodes: usize,
    #[arg(long, default_value_t = 100_000.0)]
    pub cluster_rate: f64,
    #[arg(long, default_value_t = 20.0)]
    pub cluster_secs: f64,
    /// Connections per worker process (each is one single-threaded process).
    #[arg(long, default_value_t = 5_000)]
    pub per_worker: usize,
    /// How the generator's clients wait for data: every this many µs one
    /// thread per worker polls all its sockets and sleeps in between (so
    /// the server's writes do not pay to wake a sleeping reader, a cost only
    /// loopback charges the server; see docs/performance.md). 0: a tokio
    /// task per connection sleeping in epoll until its data arrives.
    #[arg(long, default_value_t = 250)]
    pub client_poll_us: u64,
    /// Runtime worker threads per node (`roomcast serve --worker-threads`);
    /// 0: the machine's cores divided by the nodes of the scenario, so the
    /// nodes together get one thread per core, as on their own machines.
    #[arg(long, default_value_t = 0)]
    pub node_threads: usize,
    /// floor and floor-sweep: how the probe writes (write: one write(2) per
    /// socket; uring: one io_uring submission per event; uring-fixed: the
    /// same on registered files).
    #[arg(long, value_enum, default_value = "write")]
    pub floor_io: floor::FloorIo,
    /// What the node scenarios measure: roomcast, or a peer server on the
    /// same Redis, clients and publisher (`socketio`: Socket.IO 4 with the
    /// official Redis adapter, `loadtest/peers/socketio`; needs `npm ci`
    /// there, see `make bench-peer`).
    #[arg(long, value_enum, default_value = "roomcast")]
    pub peer: common::Peer,
    /// Keep the run directory (node and redis logs) after the run.
    #[arg(long)]
    pub keep: bool,
    /// Exit non-zero when any row lost a delivery or a connection (latency
    /// is not judged): for smoke runs in the test suite.
    #[arg(long)]
    pub check: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Worker { spec } => worker::main(serde_json::from_str(&spec)?),
        Cmd::Floor { listen, rooms, io } => floor::main(listen, rooms, io),
        Cmd::Run(opts) => {
            common::raise_nofile();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let res = rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = scenarios::run(opts) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                    _ = term.recv() => Err(anyhow::anyhow!("terminated")),
                }
            });
            procs::kill_all();
            res
        }
    }
}
