//! A child process's CPU time and memory, read from /proc, for the benches.
#![allow(dead_code)]

use std::process::Command;

/// User and system CPU seconds `pid` has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: utime and stime are 14th and 15th overall.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `/proc/PID/status` memory line in KiB: `VmRSS` (now) or `VmHWM` (peak).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Pins this process to core 1 (the load side; the measured child gets core 0).
pub fn pin_to_core_1() {
    let _ = Command::new("taskset")
        .args(["-p", "-c", "1", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status();
}

/// `balanced ARGS...` pinned to core 0 with `env` added, logging errors only.
pub fn balanced_on_core_0(args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_balanced")])
        .args(args)
        .envs(env.iter().copied())
        .env("BALANCED_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start balanced")
}
