//! `files`: static files of 1 MiB (wrk, 16 connections) and 256 MiB (curl, several downloads on one
//! connection). On loopback the client limits GB/s (it copies every byte in), so the server CPU
//! seconds per GB is the number that shows whether bytes are copied through user space.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::{ours_label, owned, CaseDef, LoadDef, Options, SuiteDef};
use crate::harness::report::{ChartMetric, Headline};
use crate::harness::servers::{Env, Kind, ServerSpec};

/// Writes `len` bytes of deterministic, incompressible-looking data (xorshift) to `path`, unless
/// a file of that size is already there.
pub fn make_file(path: &Path, len: u64) -> Result<()> {
    if fs::metadata(path).map(|m| m.len() == len).unwrap_or(false) {
        return Ok(());
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ len;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Requests per second of the fixed-rate 1 MiB case: about 2 GB/s, well under every Rust and
/// nginx server's saturation on this kind of machine, so each serves all of it.
const FIXED_SMALL_PER_S: u32 = 2_000;

/// Requests per second of the fixed-rate large-file case: about 1 GB/s of 256 MiB downloads.
const FIXED_BIG_PER_S: u32 = 4;

/// The suite.
pub fn define(env: &Env, opts: &Options) -> Result<SuiteDef> {
    let root = env.work.join("files");
    fs::create_dir_all(&root)?;
    let big_mib: u64 = if opts.quick { 32 } else { 256 };
    let big = format!("{big_mib}mib.bin");
    let root_s = root.display().to_string();
    let ours_args = vec!["--workers".into(), "2".into(), "--root".into(), root_s];
    let servers = vec![
        ServerSpec::new(
            "ours",
            &ours_label(&owned(&["--workers", "2", "--root", "DIR"])),
            Kind::Ours(ours_args),
        )
        .flags(&["--root"])
        .route("/static/1mib.bin"),
        ServerSpec::new(
            "servedir",
            "tower-http ServeDir (defaults)",
            Kind::ServeDir(root.clone()),
        ),
        ServerSpec::new(
            "nginx",
            "nginx, sendfile on, tcp_nopush on",
            Kind::Nginx(root.clone()),
        ),
        ServerSpec::new(
            "node",
            "Node createReadStream().pipe(res)",
            Kind::Node {
                workers: 0,
                root: Some(root.clone()),
            },
        )
        .route("/static/1mib.bin"),
    ];
    // 24 downloads: about two seconds of one server's saturating load, so that the case's CPU
    // time (a few tenths of a second) averages over more of this machine's swings.
    let downloads = if opts.quick { 2 } else { 24 };
    let mut cases = Vec::new();
    for s in &servers {
        cases.push(CaseDef {
            group: "1 MiB".into(),
            server: s.id.clone(),
            baseline: s.id == "nginx",
            load: LoadDef::Wrk {
                path: "/static/1mib.bin".into(),
                connections: 16,
                close: false,
            },
            counter: None,
            settle: Duration::ZERO,
        });
    }
    let big_group: &str = &format!("{big_mib} MiB");
    for s in &servers {
        cases.push(CaseDef {
            group: big_group.to_owned(),
            server: s.id.clone(),
            baseline: s.id == "nginx",
            load: LoadDef::Curl {
                path: format!("/static/{big}"),
                count: downloads,
            },
            counter: None,
            settle: Duration::ZERO,
        });
    }
    let run_for = opts.duration(Duration::from_secs(1), Duration::from_secs(4));
    // The same bytes at a fixed rate for every server: CPU seconds per GB then compares the
    // work each server does for identical traffic, which the saturating runs above cannot
    // (there every server competes with its client for the same two cores).
    // (A quick run keeps the small one: a second of 4 downloads is below the CPU clock's
    // resolution anyway.)
    let mut fixed = vec![(
        "1 MiB",
        "/static/1mib.bin".to_owned(),
        FIXED_SMALL_PER_S,
        run_for,
    )];
    if !opts.quick {
        // Twice as long: at 4 downloads per second, 4 s is only 16 responses.
        fixed.push((
            big_group,
            format!("/static/{big}"),
            FIXED_BIG_PER_S,
            run_for * 2,
        ));
    }
    for (group, path, rate, run_for) in fixed {
        for s in &servers {
            cases.push(CaseDef {
                group: format!("{group} at a fixed {rate} req/s"),
                server: s.id.clone(),
                baseline: s.id == "nginx",
                load: LoadDef::open_loop(path.clone(), rate, run_for, "10s", &[]),
                counter: None,
                settle: Duration::ZERO,
            });
        }
    }
    Ok(SuiteDef {
        name: "files".into(),
        title: format!("static files: 1 MiB and {big_mib} MiB"),
        about: "Serving a file from the page cache. GB/s on loopback is bounded by the client; \
                server CPU seconds per GB shows the copies a server makes. Baseline: nginx with \
                `sendfile on`. The Node peer serves the files with the same `/static/` prefix."
            .into(),
        headline: Headline::Gbps,
        counter_name: None,
        show_success: false,
        chart: vec![ChartMetric::Headline, ChartMetric::CpuPerUnit],
        servers,
        cases,
        rounds: opts.rounds(3, 7),
        run_for,
        warmup: opts.duration(Duration::from_millis(500), Duration::from_secs(1)).min(run_for),
        load: format!(
            "1 MiB: wrk 16 connections for {}; {big_mib} MiB: curl, {downloads} downloads on one \
             connection; fixed rate: loadgen open at {FIXED_SMALL_PER_S} and {FIXED_BIG_PER_S} req/s",
            humantime::format_duration(run_for)
        ),
        tools: vec!["wrk", "curl", "nginx", "node", "rustc", "kernel"],
        notes: vec![
            "Pin with `--pin` (servers on CPU 1, clients on CPU 0) to reproduce the research note's setup."
                .into(),
            "The fixed-rate groups send every server the same requests per second (open loop), so \
             their CPU per GB compares the work done for identical traffic; a server that cannot \
             keep up shows a lower GB/s there."
                .into(),
        ],
        files: vec![(root.join("1mib.bin"), 1 << 20), (root.join(&big), big_mib << 20)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_files_of_exact_size_once() {
        let dir = std::env::temp_dir().join(format!("benches-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        make_file(&p, 100_003).unwrap();
        let a = fs::read(&p).unwrap();
        assert_eq!(a.len(), 100_003);
        // Not a constant fill: a byte value repeats no more than a few hundred times.
        assert!(a.iter().filter(|&&b| b == a[0]).count() < 2_000);
        make_file(&p, 100_003).unwrap();
        assert_eq!(fs::read(&p).unwrap(), a);
        fs::remove_dir_all(&dir).unwrap();
    }
}
