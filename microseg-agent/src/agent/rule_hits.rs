//! Rule hits as users see them: each rule's connections and packets, each default
//! deny's denied packets, and when each was last hit, for `microseg rule-hits`,
//! `get policies -o wide`, `describe policy` and metrics.
//!
//! The kernel counts in slots (`RULE_HITS`); the enforced generation's name tables say
//! which rule each slot counts. The ledger samples the slots every `SAMPLE_EVERY` and
//! whenever asked, and remembers when each rule's count last grew: "no hits since T"
//! is known to the sampling period. A slot that changes owner starts a new record.
//! Counts and times start with the agent (or with the rule, if it is newer).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use aya::maps::{Map, MapData, PerCpuArray};
use chrono::{DateTime, SecondsFormat, Utc};
use microseg_common::{maps, policy::Direction, rule_hits::RuleHits};
use serde_json::{Value, json};

use crate::{
    datapath::rule_hits,
    event_view::{EventNames, rule_policy_json},
    policy::{HitSlotOwner, RuleRef},
};

/// How often the ledger samples the counters by itself.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// What a slot counts, by stable names (ids change over an agent restart, names not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CountedThing {
    Rule(Arc<RuleRef>),
    DefaultDeny {
        workload: String,
        direction: Direction,
    },
}

#[derive(Clone, Debug)]
pub struct HitRecord {
    pub counted: CountedThing,
    pub hits: RuleHits,
    /// The first sample that saw the count grow after the previous one.
    pub last_hit: Option<SystemTime>,
    /// When this record started counting.
    pub since: SystemTime,
}

pub struct RuleHitLedger {
    map: Mutex<PerCpuArray<MapData, RuleHits>>,
    /// Records by slot, and when they were last sampled.
    records: Mutex<(BTreeMap<u16, HitRecord>, Option<SystemTime>)>,
    started: SystemTime,
}

impl RuleHitLedger {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join("maps").join(maps::RULE_HITS);
        let data = MapData::from_pin(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Ok(Self {
            map: Mutex::new(PerCpuArray::try_from(Map::PerCpuArray(data))?),
            records: Mutex::new((BTreeMap::new(), None)),
            started: SystemTime::now(),
        })
    }

    /// Reads every slot the enforced generation names and updates the records.
    pub fn sample(&self, names: &EventNames) {
        let now = SystemTime::now();
        let read = {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            match rule_hits::read(&map, names.hit_slots.keys().copied()) {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!("reading rule hit counters: {e}");
                    return;
                }
            }
        };
        let mut guard = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let (records, last_sample) = &mut *guard;
        // A slot first seen now was zeroed when its compile handed it out, after the
        // last sample: it is known to count from now (from the agent's start at the
        // first sample).
        let since = if last_sample.is_some() {
            now
        } else {
            self.started
        };
        *last_sample = Some(now);
        records.retain(|slot, _| names.hit_slots.contains_key(slot));
        for (slot, hits) in read {
            let Some(counted) = names
                .hit_slots
                .get(&slot)
                .and_then(|owner| counted_thing(names, *owner))
            else {
                continue;
            };
            match records.get_mut(&slot) {
                Some(record) if record.counted == counted => {
                    if hits.packets > record.hits.packets || hits.flows > record.hits.flows {
                        record.last_hit = Some(now);
                    }
                    record.hits = hits;
                }
                _ => {
                    let grew = hits.packets > 0 || hits.flows > 0;
                    records.insert(
                        slot,
                        HitRecord {
                            counted,
                            hits,
                            last_hit: grew.then_some(now),
                            since,
                        },
                    );
                }
            }
        }
    }

    /// The records, after a fresh sample.
    pub fn records(&self, names: &EventNames) -> Vec<HitRecord> {
        self.sample(names);
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .values()
            .cloned()
            .collect()
    }

    /// The report the API serves (`Request::RuleHits`).
    pub fn report(&self, names: &EventNames) -> Value {
        let records = self.records(names);
        let rules: Vec<Value> = records.iter().map(record_json).collect();
        let counted_rules = records
            .iter()
            .filter(|r| matches!(r.counted, CountedThing::Rule(_)))
            .count();
        json!({
            "rules": rules,
            "uncountedRules": names.rules.len().saturating_sub(counted_rules),
            "sampledAt": time_text(SystemTime::now()),
            "samplePeriodSeconds": SAMPLE_EVERY.as_secs(),
        })
    }

    /// Samples every `SAMPLE_EVERY` until the task is stopped.
    pub async fn run(self: Arc<Self>, names: Arc<RwLock<Arc<EventNames>>>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let names = names.read().unwrap_or_else(PoisonError::into_inner).clone();
            let ledger = self.clone();
            tokio::task::spawn_blocking(move || ledger.sample(&names)).await?;
        }
    }
}

fn counted_thing(names: &EventNames, owner: HitSlotOwner) -> Option<CountedThing> {
    match owner {
        HitSlotOwner::Rule(rule_id) => names.rules.get(&rule_id).cloned().map(CountedThing::Rule),
        HitSlotOwner::DefaultDeny {
            endpoint_id,
            direction,
        } => names
            .endpoints
            .get(&endpoint_id)
            .map(|workload| CountedThing::DefaultDeny {
                workload: workload.clone(),
                direction,
            }),
    }
}

fn time_text(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// One record as JSON: what it counts (the policy as events name it), the counts,
/// and the times.
pub fn record_json(record: &HitRecord) -> Value {
    let mut item = match &record.counted {
        CountedThing::Rule(rule) => {
            let mut item = rule_policy_json(rule);
            item["direction"] = json!(rule.direction.name());
            item["rule"] = json!(rule.rule_index);
            item
        }
        CountedThing::DefaultDeny {
            workload,
            direction,
        } => json!({
            "kind": "DefaultDeny",
            "workload": workload,
            "direction": if *direction == Direction::Ingress { "ingress" } else { "egress" },
        }),
    };
    item["packets"] = json!(record.hits.packets);
    if matches!(record.counted, CountedThing::Rule(_)) {
        item["connections"] = json!(record.hits.flows);
    }
    item["lastHit"] = record.last_hit.map_or(Value::Null, |t| json!(time_text(t)));
    item["countingSince"] = json!(time_text(record.since));
    item
}
