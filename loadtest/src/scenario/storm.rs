//! `storm`: N clients connect at once (ticket, then stream, no pacing); then
//! every client drops at the same moment and reconnects at once with its
//! ticket, as EventSource does. Measures the time until all are open again
//! and the errors by kind (a 429 on reconnect means a closed stream's limit
//! slot was not freed in time).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{clients, open, open_limit, seed, wait_open, workers_for, Opened, Ramp, Target};
use crate::client::now_ns;
use crate::fleet::Fleet;
use crate::proc::Foreign;
use crate::protocol::{Command, StreamKind};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StormResult {
    pub target: String,
    /// Gateway processes sharing the port (1 for the other targets).
    #[serde(default = "super::one")]
    pub instances: usize,
    pub clients: u64,
    pub connect: Opened,
    pub reconnect: Opened,
    /// CPU used during the scenario by processes outside this run, % of one core.
    pub foreign_cpu_pct: f64,
}

pub fn run(target: &Target, run_id: &str, n: u64, ramp: Ramp) -> Result<StormResult, String> {
    let all = clients(run_id, n, 100, "d", StreamKind::Data);
    if let Some(redis) = target.redis {
        seed(redis, &all)?;
    }
    let mut fleet = Fleet::spawn(workers_for(n, ramp.per_worker))?;
    let at_once = Ramp {
        concurrency: n as usize,
        ..ramp
    };
    let foreign = Foreign::start(&target.measured_pids());
    let t0 = open(&mut fleet, target, &all, at_once)?;
    let label = format!("{} storm {n}", target.label());
    let connect = wait_open(
        &mut fleet,
        &format!("{label} connect"),
        n,
        t0,
        open_limit(n),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    fleet.all(Command::Drop)?;
    fleet.reset()?;
    let t1 = now_ns();
    let per = (n as usize).div_ceil(fleet.len()).max(1);
    fleet.all(Command::Reconnect {
        concurrency: per,
        attempts: ramp.attempts,
    })?;
    let reconnect = wait_open(
        &mut fleet,
        &format!("{label} reconnect"),
        n,
        t1,
        open_limit(n),
    )?;
    Ok(StormResult {
        target: target.kind.name().into(),
        instances: target.instances,
        clients: n,
        connect,
        reconnect,
        foreign_cpu_pct: foreign.pct(),
    })
}
