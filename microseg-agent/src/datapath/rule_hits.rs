//! The rule hit counters (`RULE_HITS`) from userspace: zeroing the slots a compile
//! handed out anew, and reading slots summed over CPUs. Which rule a slot counts is
//! the compiler's `HitSlotTable`.

use std::borrow::{Borrow, BorrowMut};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use microseg_common::{maps, rule_hits::RuleHits};

use super::DatapathError;

fn map_err(source: impl Into<aya::maps::MapError>) -> DatapathError {
    DatapathError::Map {
        map: maps::RULE_HITS,
        source: Box::new(source.into()),
    }
}

/// Zeroes `slots` on every CPU, before entries that count in them are written.
pub fn reset<T: BorrowMut<MapData>>(
    rule_hits: &mut PerCpuArray<T, RuleHits>,
    slots: &[u16],
) -> Result<(), DatapathError> {
    if slots.is_empty() {
        return Ok(());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
        map: maps::RULE_HITS,
        source: Box::new(aya::maps::MapError::IoError(e)),
    })?;
    for &slot in slots {
        let zero = PerCpuValues::try_from(vec![RuleHits::default(); cpus]).map_err(|e| {
            DatapathError::Map {
                map: maps::RULE_HITS,
                source: Box::new(aya::maps::MapError::IoError(e)),
            }
        })?;
        rule_hits.set(u32::from(slot), zero, 0).map_err(map_err)?;
    }
    Ok(())
}

/// The hits of `slots`, summed over CPUs, in the order given.
pub fn read<T: Borrow<MapData>>(
    rule_hits: &PerCpuArray<T, RuleHits>,
    slots: impl IntoIterator<Item = u16>,
) -> Result<Vec<(u16, RuleHits)>, DatapathError> {
    slots
        .into_iter()
        .map(|slot| {
            let values = rule_hits.get(&u32::from(slot), 0).map_err(map_err)?;
            let sum = values
                .iter()
                .fold(RuleHits::default(), |sum, cpu| RuleHits {
                    packets: sum.packets + cpu.packets,
                    flows: sum.flows + cpu.flows,
                });
            Ok((slot, sum))
        })
        .collect()
}
