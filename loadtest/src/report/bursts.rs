//! The burst tables of a report section: broadcast (one alert to every
//! stream at once) and storm (every client connects, drops and reconnects at
//! once), every server side by side with the ratios.

use std::fmt::Write as _;

use super::{columns, errors, num, pair_label, pairs, ratio, Col, Results};

pub(super) fn broadcast_table(md: &mut String, r: &Results) {
    if r.broadcast.is_empty() {
        return;
    }
    let _ = writeln!(md, "### broadcast\n");
    let _ = writeln!(
        md,
        "N alert streams whose users all own one device; one `machine:alerts` event is published per round; \
         time from publish until the last client parsed it (median and worst over the rounds) and the median client.\n"
    );
    let _ = writeln!(md, "| streams | target | all received | last client, median of rounds (ms) | last client, worst (ms) | median client (ms) | other load % |");
    let _ = writeln!(md, "|---:|---|:-:|---:|---:|---:|---:|");
    let mut sizes: Vec<u64> = r.broadcast.iter().map(|b| b.streams).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let cols = columns(r.broadcast.iter().map(|b| (b.target.as_str(), b.instances)));
    for n in sizes {
        let mut meds: Vec<(Col, Option<f64>)> = Vec::new();
        for c in &cols {
            let Some(b) = r
                .broadcast
                .iter()
                .find(|b| b.streams == n && c.is(&b.target, b.instances))
            else {
                continue;
            };
            let mut last: Vec<f64> = b.rounds.iter().map(|x| x.last_ms).collect();
            last.sort_by(f64::total_cmp);
            let med = last.get(last.len() / 2).copied();
            let worst = last.last().copied();
            let mut p50: Vec<f64> = b.rounds.iter().map(|x| x.p50_ms).collect();
            p50.sort_by(f64::total_cmp);
            meds.push((*c, med));
            let _ = writeln!(
                md,
                "| {n} | {} | {} ({}/{} open) | {} | {} | {} | {:.0} |",
                c.label(),
                if b.all_received { "yes" } else { "**no**" },
                b.open.opened,
                n,
                num(med, 1),
                num(worst, 1),
                num(p50.get(p50.len() / 2).copied(), 1),
                b.foreign_cpu_pct
            );
        }
        for p in pairs(&cols) {
            let get = |c: &Col| meds.iter().find(|(x, _)| x == c).and_then(|(_, m)| *m);
            let _ = writeln!(
                md,
                "| {n} | {} | | {} | | | |",
                pair_label(&p),
                ratio(get(&p.0), get(&p.1))
            );
        }
    }
    md.push('\n');
}

pub(super) fn storm_table(md: &mut String, r: &Results) {
    if r.storm.is_empty() {
        return;
    }
    let _ = writeln!(md, "### storm\n");
    let _ = writeln!(
        md,
        "N clients connect at once (ticket + stream, no pacing), then all drop at once and reconnect at once \
         with their tickets. Failed attempts are retried after 50–1600 ms, up to the attempt limit. \
         A `http_429` on reconnect is a closed stream whose limit slot was not yet free.\n"
    );
    let _ = writeln!(md, "| clients | target | connect: all open (s) | connect errors | reconnect: all open (s) | reconnect errors | other load % |");
    let _ = writeln!(md, "|---:|---|---:|---|---:|---|---:|");
    let mut sizes: Vec<u64> = r.storm.iter().map(|s| s.clients).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let cols = columns(r.storm.iter().map(|s| (s.target.as_str(), s.instances)));
    for n in sizes {
        let mut secs: Vec<(Col, f64, f64)> = Vec::new();
        for c in &cols {
            let Some(s) = r
                .storm
                .iter()
                .find(|s| s.clients == n && c.is(&s.target, s.instances))
            else {
                continue;
            };
            let _ = writeln!(
                md,
                "| {n} | {} | {:.2} ({}/{n}) | {} | {:.2} ({}/{n}) | {} | {:.0} |",
                c.label(),
                s.connect.secs,
                s.connect.opened,
                errors(&s.connect),
                s.reconnect.secs,
                s.reconnect.opened,
                errors(&s.reconnect),
                s.foreign_cpu_pct
            );
            secs.push((*c, s.connect.secs, s.reconnect.secs));
        }
        for p in pairs(&cols) {
            let get = |c: &Col| {
                secs.iter()
                    .find(|(x, _, _)| x == c)
                    .map(|(_, a, b)| (*a, *b))
            };
            let (a, b) = (get(&p.0), get(&p.1));
            let _ = writeln!(
                md,
                "| {n} | {} | {} | | {} | | |",
                pair_label(&p),
                ratio(a.map(|v| v.0), b.map(|v| v.0)),
                ratio(a.map(|v| v.1), b.map(|v| v.1))
            );
        }
    }
    md.push('\n');
}
