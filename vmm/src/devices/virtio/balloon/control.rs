//! The balloon's control-socket commands (`vmm ctl PATH balloon ...`),
//! run as jobs on the vCPU thread, which owns the device.

use std::time::{Duration, Instant};

use crate::control::{JobResult, VmControl};
use crate::machine::Machine;

/// How long `balloon stats` waits for the guest to refill its buffer.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

fn no_balloon() -> String {
    "this VM has no balloon (start it with --balloon SIZE)".into()
}

/// `balloon set`: a new target; the guest is told by a configuration-change
/// interrupt.
///
/// # Errors
/// No balloon, or a target that is not a page multiple within guest RAM.
pub fn set(control: &VmControl, bytes: u64) -> JobResult {
    control.call(Box::new(move |m: &mut Machine| {
        let ram = m.vm.ram().size();
        if bytes % super::pages::PAGE != 0 || bytes > ram {
            return Err(format!("balloon target {bytes} must be a multiple of 4096 and at most the guest memory ({ram})"));
        }
        let b = m.devices.balloon.as_mut().ok_or_else(no_balloon)?;
        if b.device.set_target(bytes) {
            b.config_changed();
        }
        serde_json::to_value(b.device.info()).map_err(|e| e.to_string())
    }))
}

/// `balloon get`: target, size, reclaimed and pending bytes, metrics.
///
/// # Errors
/// No balloon.
pub fn get(control: &VmControl) -> JobResult {
    control.call(Box::new(|m: &mut Machine| {
        let b = m.devices.balloon.as_ref().ok_or_else(no_balloon)?;
        serde_json::to_value(b.device.info()).map_err(|e| e.to_string())
    }))
}

/// `balloon stats`: hands the guest its stats buffer back and waits until
/// it returns it refilled.
///
/// # Errors
/// No balloon, no stats queue, or a guest that does not answer in time.
pub fn stats(control: &VmControl) -> JobResult {
    let before = control.call(Box::new(|m: &mut Machine| {
        let ram = m.vm.ram();
        let b = m.devices.balloon.as_mut().ok_or_else(no_balloon)?;
        let updates = b.device.metrics.stats_updates;
        if !b.device.request_stats() {
            return Err("the guest's driver has not set up a statistics queue".into());
        }
        b.flush_pending(ram);
        Ok(serde_json::json!(updates))
    }))?;
    let deadline = Instant::now() + STATS_TIMEOUT;
    loop {
        let before = before.clone();
        let now = control.call(Box::new(move |m: &mut Machine| {
            let b = m.devices.balloon.as_ref().ok_or_else(no_balloon)?;
            if serde_json::json!(b.device.metrics.stats_updates) == before {
                return Ok(serde_json::Value::Null);
            }
            serde_json::to_value(b.device.stats()).map_err(|e| e.to_string())
        }))?;
        if !now.is_null() {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err("the guest did not refill its statistics buffer within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
