//! Simulated machines for `--demo`: `Machine 1`..`Machine 6`, owned by user
//! `demo`, publishing through the same [`Hub`] path as Redis messages do:
//! realtime values about once a second, SPC cycles every few seconds, and now
//! and then an alert or an alarm.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rand::Rng;
use serde_json::json;

use crate::ingress::Hub;
use crate::store::memory::Memory;
use crate::stream::frame::Event;

pub const USER: &str = "demo";
pub const MACHINES: usize = 6;

pub fn machine(n: usize) -> String {
    format!("Machine {n}")
}

/// Grants the demo user its machines and seeds their status snapshots.
pub fn seed(memory: &Memory) {
    for n in 1..=MACHINES {
        let id = machine(n);
        memory.grant(USER, &id);
        let status =
            json!({"devId": id, "state": "running", "Data": {"T1": 200 + n * 5, "OT": 55}});
        memory.set_status(&id, status.to_string());
    }
}

struct Machine {
    id: String,
    temp: f64,
    oil: f64,
    rpm: f64,
    cycle: u64,
    cycle_time: f64,
}

/// Starts the thread that drives the machines.
pub fn start(hub: Arc<Hub>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("demo-machines".into())
        .spawn(move || run(&hub))
}

fn run(hub: &Hub) {
    let mut rng = rand::rng();
    let mut machines: Vec<Machine> = (1..=MACHINES)
        .map(|n| Machine {
            id: machine(n),
            temp: 200.0 + n as f64 * 5.0,
            oil: 55.0,
            rpm: 1200.0 + n as f64 * 50.0,
            cycle: 8800 + n as u64 * 10,
            cycle_time: 36.0,
        })
        .collect();
    let mut tick: u64 = 0;
    loop {
        thread::sleep(Duration::from_millis(1000));
        tick += 1;
        for m in machines.iter_mut() {
            m.temp += rng.random_range(-1.5..1.5) + (210.0 - m.temp) * 0.05;
            m.oil += rng.random_range(-0.4..0.4) + (56.0 - m.oil) * 0.05;
            m.rpm += rng.random_range(-20.0..20.0) + (1300.0 - m.rpm) * 0.05;
            let realtime = json!({
                "deviceId": m.id,
                "data": {"devId": m.id, "Data": {"T1": round1(m.temp), "OT": round1(m.oil), "RPM": m.rpm.round(), "OPM": rng.random_range(2..5)}},
            });
            let _ = hub.publish_event(Event::RealtimeUpdate, realtime.to_string().as_bytes());
            if tick % 3 == 0 {
                m.cycle += 1;
                m.cycle_time = 36.0 + rng.random_range(-0.8..0.8);
                let spc = json!({"deviceId": m.id, "data": {"devId": m.id, "Data": {"CYCN": m.cycle, "ECYCT": round2(m.cycle_time)}}});
                let _ = hub.publish_event(Event::SpcUpdate, spc.to_string().as_bytes());
            }
            if tick % 5 == 0 {
                let series: Vec<f64> = (0..10)
                    .map(|_| round2(36.0 + rng.random_range(-0.8..0.8)))
                    .collect();
                let msg = json!({"deviceId": m.id, "data": {"devId": m.id, "field": "ECYCT", "values": series}});
                let _ = hub.publish_event(Event::SpcSeriesUpdate, msg.to_string().as_bytes());
            }
        }
        if rng.random_ratio(1, 15) {
            let m = &machines[rng.random_range(0..MACHINES)];
            let (severity, message) = if m.temp > 211.0 {
                (
                    "warning",
                    format!("Barrel temperature high: {:.1} °C", m.temp),
                )
            } else {
                ("info", "Mold change requested".to_owned())
            };
            let alert =
                json!({"deviceId": m.id, "alert": {"alertType": severity, "message": message}});
            let _ = hub.publish_event(Event::MachineAlert, alert.to_string().as_bytes());
        }
        if rng.random_ratio(1, 25) {
            let m = &machines[rng.random_range(0..MACHINES)];
            let active = rng.random_bool(0.5);
            let alarm = json!({"deviceId": m.id, "alarm": {"code": "E-104", "text": "Oil pressure low", "active": active}});
            let _ = hub.publish_event(Event::AlarmUpdate, alarm.to_string().as_bytes());
        }
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
