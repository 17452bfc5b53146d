//! What the node needs to know of a Redis Cluster's layout itself (the cluster client routes commands
//! on its own): one slot served by each shard's primary, and a hash tag that lands in a given slot, so
//! that a probe can be sent through every shard.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use herald_core::EngineError;

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use crate::connection::{Commands, Conn, Live, lock};

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// Redis Cluster's slot of a hash tag (CRC16/XMODEM modulo the slot count); a channel's keys carry the
/// channel name as their tag.
pub(crate) fn slot_of(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS
}

/// A short hash tag whose slot is `slot` (found by trying `p0`, `p1`, …; remembered).
pub(crate) fn tag_for_slot(slot: u16) -> String {
    static FOUND: OnceLock<Mutex<HashMap<u16, String>>> = OnceLock::new();
    let found = FOUND.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(tag) = lock(found).get(&slot) {
        return tag.clone();
    }
    // Every slot is reached within a few hundred thousand tries (CRC16 spreads short strings evenly).
    let tag = (0u32..).map(|n| format!("p{n}")).find(|tag| slot_of(tag) == slot % SLOTS).unwrap_or_default();
    lock(found).insert(slot, tag.clone());
    tag
}

/// The first slot of each shard's primary (`CLUSTER SLOTS`, asked of a primary: a hung replica must not
/// stall the probe), one per primary, in slot order.
pub(crate) async fn primary_slots(commands: &Commands, live: &Live) -> Result<Vec<u16>, EngineError> {
    let Conn::Cluster(mut conn) = live.conn.clone() else {
        return Err(EngineError::Protocol("not a Redis Cluster".into()));
    };
    let command = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
    let to_a_primary = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
    let answer = commands.on(live, conn.route_command(command, to_a_primary)).await?;
    let protocol = || EngineError::Protocol("unexpected CLUSTER SLOTS answer".into());
    let redis::Value::Array(ranges) = answer else { return Err(protocol()) };
    let mut first: HashMap<String, u16> = HashMap::new();
    for range in ranges {
        let redis::Value::Array(fields) = range else { return Err(protocol()) };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Array(primary))) = (fields.first(), fields.get(2))
        else {
            return Err(protocol());
        };
        // The primary's node ID, or its address from servers too old to send one.
        let id = match (primary.get(2), primary.first(), primary.get(1)) {
            (Some(redis::Value::BulkString(id)), _, _) => String::from_utf8_lossy(id).into_owned(),
            (_, Some(host), Some(port)) => format!("{host:?}:{port:?}"),
            _ => return Err(protocol()),
        };
        let start = u16::try_from(*start).map_err(|_| protocol())?;
        first.entry(id).and_modify(|s| *s = (*s).min(start)).or_insert(start);
    }
    let mut slots: Vec<u16> = first.into_values().collect();
    slots.sort_unstable();
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Values from Redis's documentation of CLUSTER KEYSLOT.
        assert_eq!(slot_of("somekey"), 11058);
        assert_eq!(slot_of("hash_tag"), 2515);
        for slot in [0, 1, 5460, 5461, 10923, 16383] {
            assert_eq!(slot_of(&tag_for_slot(slot)), slot);
        }
    }
}
