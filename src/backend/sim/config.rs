//! The simulated machine's configuration: its devices, link speeds and driver costs,
//! from code or the environment (`HETMEM_SIM_DEVICES`, `HETMEM_SIM_MEMORY`).

use std::time::Duration;

use super::DriverCosts;
use crate::error::{Error, Result};

/// One simulated device.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDevice {
    /// Name reported in [`DeviceInfo`](crate::backend::DeviceInfo).
    pub name: String,
    /// Device memory in bytes.
    pub capacity: usize,
    /// PCI address reported to the topology (to test NUMA affinity against fixtures).
    pub pci_bus_id: Option<String>,
}

/// Speeds and sizes of the simulated machine.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The devices.
    pub devices: Vec<SimDevice>,
    /// Host→device bandwidth from pinned memory, GB/s (10⁹ bytes per second).
    pub h2d_gbps: f64,
    /// Device→host bandwidth to pinned memory, GB/s.
    pub d2h_gbps: f64,
    /// Bandwidth of either direction when the host side is pageable, GB/s.
    pub pageable_gbps: f64,
    /// Device→device bandwidth (same or another device), GB/s.
    pub d2d_gbps: f64,
    /// Fixed cost of every copy and prefetch.
    pub copy_latency: Duration,
    /// What each driver call costs the host ([`DriverCosts::zero`] for none).
    pub driver: DriverCosts,
}

/// H200 device memory as the driver reports it (143,771,336,704 bytes ≈ 133.9 GiB).
pub const H200_MEMORY: usize = 143_771_336_704;

impl Default for SimConfig {
    /// One H200-like device on a PCIe Gen5 x16 link, with the figures measured in
    /// DESIGN.md: 55.3 GB/s pinned each way, 6–11 GB/s pageable (8 taken).
    fn default() -> Self {
        SimConfig {
            devices: vec![SimDevice {
                name: "sim-H200".into(),
                capacity: H200_MEMORY,
                pci_bus_id: None,
            }],
            h2d_gbps: 55.3,
            d2h_gbps: 55.3,
            pageable_gbps: 8.0,
            d2d_gbps: 2000.0,
            copy_latency: Duration::from_micros(8),
            driver: DriverCosts::default(),
        }
    }
}

impl SimConfig {
    /// `n` identical devices of `capacity` bytes each, default speeds.
    pub fn with_devices(n: usize, capacity: usize) -> Self {
        SimConfig {
            devices: (0..n)
                .map(|_| SimDevice {
                    name: "sim-H200".into(),
                    capacity,
                    // No PCI slot: a made-up one could name a real device in sysfs.
                    pci_bus_id: None,
                })
                .collect(),
            ..SimConfig::default()
        }
    }

    /// The default, changed by `HETMEM_SIM_DEVICES` (count) and `HETMEM_SIM_MEMORY`
    /// (bytes per device, with an optional `K`, `M`, `G` or `T` binary suffix).
    pub fn from_env() -> Result<Self> {
        let mut cfg = SimConfig::default();
        let capacity = match std::env::var("HETMEM_SIM_MEMORY") {
            Ok(s) => parse_bytes(&s).ok_or_else(|| {
                Error::InvalidArgument(format!("HETMEM_SIM_MEMORY={s:?} is not a byte size"))
            })?,
            Err(_) => H200_MEMORY,
        };
        let count = match std::env::var("HETMEM_SIM_DEVICES") {
            Ok(s) => s.trim().parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!("HETMEM_SIM_DEVICES={s:?} is not a count"))
            })?,
            Err(_) => 1,
        };
        if count != 1 || capacity != H200_MEMORY {
            cfg = SimConfig {
                devices: SimConfig::with_devices(count, capacity).devices,
                ..cfg
            };
        }
        Ok(cfg)
    }
}

/// Parses `123`, `64K`, `512M`, `80G`, `1T` (binary multiples).
pub(super) fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()?
        .checked_mul(1usize << shift)
}

/// Most simulated devices of one simulator.
pub const MAX_DEVICES: usize = 1024;
/// Most memory of one simulated device (1 PiB).
pub const MAX_CAPACITY: usize = 1 << 50;
