//! Red-packet rain pools (SPEC Q7-Q8) on the cluster: the pool actor, its replication, and
//! every node's durable copies.
//!
//! # Placement and fencing
//!
//! A rain's pool runs on the ring's owner of `rain/<id>`. Activating it claims the key
//! through Raft (`ClaimOwnership`), which gives a new, higher epoch; the new owner then asks
//! every live node for its copy (`Recover`), which fences that node at the new epoch: from
//! then on it refuses the older owners' writes, and stops its own pool if it ran one.
//!
//! # Quorum
//!
//! A grab is answered with an amount only once its grant is held by a majority of the
//! cluster's members (`⌊n/2⌋ + 1` of the `n` members in the metadata, down ones
//! included), the owner's own sled copy counting as one. Activation needs answers from a
//! majority too (the owner included) and continues from the most advanced copy among them,
//! by (epoch, grants). Any majority that acknowledged a grant meets any majority that
//! answers a recovery, and a node answers a recovery only after refusing older writes, so
//! every answered grant reaches every later owner. With 3 nodes: the owner and one more;
//! when two of three are gone, grabs wait (answered `unavailable` after
//! [`GRAB_COMMIT_TIMEOUT_MS`]; a retry with the same request id gets the same grant) rather
//! than risk paying a packet twice.
//!
//! # Replication
//!
//! The pool appends grants to its own copy at once and wakes one replication task per other
//! member, which sends the grants that member lacks (`Append`, at most
//! [`APPEND_GRANTS_MAX`] at a time) or, when it lacks the base (a new member, a copy of an
//! older epoch), the whole copy (`Full`: the definition and the grants; the packets are
//! recomputed from the seed). A member answers with what it holds; the pool answers the
//! grabs the majority now covers. A member that refuses as fenced stops the pool.
//!
//! # Copies
//!
//! Each node keeps its copies in sled: tree `rains/copies` (epoch, definition, refund per
//! rain), `rains/grants` (one entry per grant, keyed by rain and index) and `rains/fences`
//! (the highest epoch seen per rain). Like room states they are not flushed per write in a
//! cluster: the majority of copies is the guarantee; sled brings them back after a restart.
//! On a node with no other member the own copy is the whole majority, so it counts only
//! once a flush covers it (the node's group commit, `common::group_commit`): a grab is
//! answered only after its grant is on the node's disk.
//!
//! # The end
//!
//! At its end the pool refunds the unclaimed cents to the creator, and once that is on a
//! majority it announces `rain.ended` and writes the ledger (one JSON line per grant, then
//! the refund) to `<data dir>/analytics/rain-<id>.ledger.jsonl`. The audit
//! (`GET /admin/rain/audit`) reads the most advanced copy among the live nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chorus_actors::rain::{GrabOutcome, Grant, RainDefinition, RainPool, RainState};
use chorus_cluster::metadata::{MetadataCommand, MetadataResponse, NodeId};
use chorus_protocol::{
    ErrorBody, ErrorCode, Event, GrabResult, RainEndedEvent, RainGrabResponse, RainStartEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use bytes::Bytes;

use crate::server::common::codec::{decode, encode, request, Domain};
use crate::server::common::keys::ActorKey;
use crate::server::context::{NodeContext, Stopping};
use crate::server::rooms::service::Rooms;

/// Grants per `Append` (and per chunk of a `Full` or a fetch).
pub const APPEND_GRANTS_MAX: usize = 5_000;
/// How long a grab waits for its grant to reach a majority before it is answered
/// `unavailable` (the grant stands: a retry with the same request id gets it).
pub const GRAB_COMMIT_TIMEOUT_MS: u64 = 5_000;
/// How long a replication or recovery call may take.
pub const RAIN_CALL_TIMEOUT_MS: u64 = 2_000;
/// Grabs queued at one pool; beyond, grabs are answered `throttled`.
pub const POOL_QUEUE_MAX: usize = 65_536;
/// A pool activates this long before its rain starts (to announce the start on time).
pub const ACTIVATE_AHEAD_MS: u64 = 2_000;
/// How long after its end a finished pool stays running.
pub const IDLE_AFTER_END_MS: u64 = 30_000;
/// Taps per second a client is assumed to make (SPEC Q7: 4-5), for the throttle factor.
pub const TAPS_PER_SEC_PER_CLIENT: f64 = 5.0;

const COPIES_TREE: &str = "rains/copies";
const GRANTS_TREE: &str = "rains/grants";
const FENCES_TREE: &str = "rains/fences";

pub use crate::server::common::keys::rain_key;

/// Messages between nodes about rains ([`Domain::Rain`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RainMessage {
    /// A grab for the pool, which this node owns (answered with a
    /// `Result<RainGrabResponse, ErrorBody>`).
    Grab {
        /// Rain.
        rain_id: String,
        /// The user.
        user: String,
        /// The client's request id.
        request_id: String,
    },
    /// A new owner activates the pool at `epoch`: refuse older writes from now on and
    /// report the copy held (answered with an `Option<CopySummary>`).
    Recover {
        /// Rain.
        rain_id: String,
        /// The new owner's epoch.
        epoch: u64,
    },
    /// Read grants `from ..` of the copy held (at most [`APPEND_GRANTS_MAX`]; answered with
    /// an `Option<CopyChunk>`).
    Fetch {
        /// Rain.
        rain_id: String,
        /// First grant.
        from: usize,
    },
    /// Replace the copy with this one, written by the owner at `epoch` (answered with a
    /// `Result<Result<Held, CopyRefused>, ErrorBody>`).
    Full {
        /// Rain.
        rain_id: String,
        /// The owner's epoch.
        epoch: u64,
        /// The rain.
        definition: RainDefinition,
        /// The first grants (the rest follow as `Append`s).
        grants: Vec<Grant>,
        /// The refund, once ended.
        refunded_cents: Option<u64>,
    },
    /// Add the owner's grants `from ..` to the copy written at `epoch` (answered with a
    /// `Result<Result<Held, CopyRefused>, ErrorBody>`; refused with
    /// [`CopyRefused::OutOfStep`] if the copy is not at that epoch or lacks grants before
    /// `from`).
    Append {
        /// Rain.
        rain_id: String,
        /// The owner's epoch.
        epoch: u64,
        /// Index of the first grant.
        from: usize,
        /// Grants.
        grants: Vec<Grant>,
        /// The refund, once ended.
        refunded_cents: Option<u64>,
    },
}

pub use chorus_actors::rain_quorum::Held;
use chorus_actors::rain_quorum::{PoolQuorum, QuorumCommand};

/// A copy's summary, for recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySummary {
    /// The epoch it was written at.
    pub epoch: u64,
    /// Grants held.
    pub grants: usize,
    /// The refund, once ended.
    pub refunded_cents: Option<u64>,
}

impl CopySummary {
    /// Orders copies: the later epoch first, then more grants, then the refund.
    fn rank(&self) -> (u64, usize, bool) {
        (self.epoch, self.grants, self.refunded_cents.is_some())
    }
}

/// Part of a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyChunk {
    /// The epoch it was written at.
    pub epoch: u64,
    /// The rain.
    pub definition: RainDefinition,
    /// Grants from the asked index.
    pub grants: Vec<Grant>,
    /// Grants held in all.
    pub total: usize,
    /// The refund, once ended.
    pub refunded_cents: Option<u64>,
}

/// The saved header of a copy (grants are saved one per entry).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedCopy {
    epoch: u64,
    definition: RainDefinition,
    refunded_cents: Option<u64>,
}

/// A copy of a rain held by this node.
#[derive(Debug, Clone)]
struct Copy {
    epoch: u64,
    state: RainState,
}

impl Copy {
    fn summary(&self) -> CopySummary {
        CopySummary {
            epoch: self.epoch,
            grants: self.state.grants.len(),
            refunded_cents: self.state.refunded_cents,
        }
    }
}

/// Why a write to a copy is refused (the answer to a write another node sends: the
/// writer acts on the kind, never on the words).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CopyRefused {
    /// A newer owner exists (the highest epoch seen).
    #[error("stale rain ownership epoch: the rain is at epoch {0}")]
    Fenced(u64),
    /// The copy does not follow (the owner then sends the whole copy).
    #[error("rain copy out of step")]
    OutOfStep,
    /// The definition does not make a rain.
    #[error("invalid rain: {0}")]
    Invalid(String),
}

/// This node's copies of rains (the pool's own included), in memory and in sled.
pub struct RainCopies {
    copies: Mutex<HashMap<String, Copy>>,
    fences: Mutex<HashMap<String, u64>>,
    trees: Option<(sled::Tree, sled::Tree, sled::Tree)>,
}

fn grant_key(rain_id: &str, index: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(rain_id.len() + 5);
    key.extend_from_slice(rain_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&(index as u32).to_be_bytes());
    key
}

fn restore_state(
    definition: RainDefinition,
    grants: Vec<Grant>,
    refunded_cents: Option<u64>,
) -> Result<RainState, CopyRefused> {
    let packets =
        chorus_actors::rain::split(definition.total_cents, definition.count, definition.seed)
            .map_err(|e| CopyRefused::Invalid(e.to_string()))?;
    Ok(RainState {
        definition,
        packets,
        grants,
        refunded_cents,
    })
}

impl RainCopies {
    /// The copies saved in `db` (an entry that does not decode is skipped and logged).
    ///
    /// # Errors
    ///
    /// sled's, opening or reading the trees.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let copies_tree = db.open_tree(COPIES_TREE)?;
        let grants_tree = db.open_tree(GRANTS_TREE)?;
        let fences_tree = db.open_tree(FENCES_TREE)?;
        let mut copies = HashMap::new();
        for entry in copies_tree.iter() {
            let (key, value) = entry?;
            let rain_id = String::from_utf8_lossy(&key).into_owned();
            let saved = match rmp_serde::from_slice::<SavedCopy>(&value) {
                Ok(saved) => saved,
                Err(error) => {
                    tracing::warn!(rain = %rain_id, %error, "skipping an undecodable rain copy");
                    continue;
                }
            };
            let mut prefix = rain_id.as_bytes().to_vec();
            prefix.push(0);
            let mut grants = Vec::new();
            for entry in grants_tree.scan_prefix(&prefix) {
                let (_, value) = entry?;
                match rmp_serde::from_slice::<Grant>(&value) {
                    Ok(grant) if grant.packet as usize == grants.len() => grants.push(grant),
                    _ => break,
                }
            }
            match restore_state(saved.definition, grants, saved.refunded_cents) {
                Ok(state) => {
                    copies.insert(
                        rain_id,
                        Copy {
                            epoch: saved.epoch,
                            state,
                        },
                    );
                }
                Err(error) => tracing::warn!(rain = %rain_id, %error, "skipping a rain copy"),
            }
        }
        let mut fences = HashMap::new();
        for entry in fences_tree.iter() {
            let (key, value) = entry?;
            if let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref()) {
                fences.insert(
                    String::from_utf8_lossy(&key).into_owned(),
                    u64::from_be_bytes(bytes),
                );
            }
        }
        Ok(RainCopies {
            copies: Mutex::new(copies),
            fences: Mutex::new(fences),
            trees: Some((copies_tree, grants_tree, fences_tree)),
        })
    }

    fn copies(&self) -> MutexGuard<'_, HashMap<String, Copy>> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fences(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.fences.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest epoch seen for `rain_id`.
    pub fn fence_of(&self, rain_id: &str) -> u64 {
        self.fences().get(rain_id).copied().unwrap_or(0)
    }

    /// Raises the fence of `rain_id` to `epoch`; the highest epoch seen after.
    fn raise_fence(&self, rain_id: &str, epoch: u64) -> u64 {
        let mut fences = self.fences();
        let fence = fences.entry(rain_id.to_string()).or_insert(0);
        if epoch > *fence {
            *fence = epoch;
            if let Some((_, _, tree)) = &self.trees {
                if let Err(error) = tree.insert(rain_id.as_bytes(), &epoch.to_be_bytes()) {
                    tracing::error!(rain = %rain_id, %error, "cannot save a rain fence");
                }
            }
        }
        *fence
    }

    fn save_header(&self, rain_id: &str, copy: &Copy) {
        let Some((tree, _, _)) = &self.trees else {
            return;
        };
        let saved = SavedCopy {
            epoch: copy.epoch,
            definition: copy.state.definition.clone(),
            refunded_cents: copy.state.refunded_cents,
        };
        let result = rmp_serde::to_vec_named(&saved)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                tree.insert(rain_id.as_bytes(), bytes)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = result {
            tracing::error!(rain = %rain_id, %error, "cannot save a rain copy");
        }
    }

    fn save_grants(&self, rain_id: &str, from: usize, grants: &[Grant]) {
        let Some((_, tree, _)) = &self.trees else {
            return;
        };
        let mut batch = sled::Batch::default();
        for (offset, grant) in grants.iter().enumerate() {
            match rmp_serde::to_vec_named(grant) {
                Ok(bytes) => batch.insert(grant_key(rain_id, from + offset), bytes),
                Err(error) => tracing::error!(rain = %rain_id, %error, "cannot encode a grant"),
            }
        }
        if let Err(error) = tree.apply_batch(batch) {
            tracing::error!(rain = %rain_id, %error, "cannot save grants");
        }
    }

    fn clear_grants(&self, rain_id: &str) {
        let Some((_, tree, _)) = &self.trees else {
            return;
        };
        let mut prefix = rain_id.as_bytes().to_vec();
        prefix.push(0);
        let mut batch = sled::Batch::default();
        for key in tree.scan_prefix(&prefix).keys().flatten() {
            batch.remove(key);
        }
        if let Err(error) = tree.apply_batch(batch) {
            tracing::error!(rain = %rain_id, %error, "cannot clear grants");
        }
    }

    fn check_fence(&self, rain_id: &str, epoch: u64, committed: u64) -> Result<(), CopyRefused> {
        let fence = self.raise_fence(rain_id, epoch).max(committed);
        if epoch < fence {
            return Err(CopyRefused::Fenced(fence));
        }
        Ok(())
    }

    /// Replaces the copy of `rain_id` with one written at `epoch` (`committed`: the
    /// ownership epoch in this node's metadata, a second fence).
    ///
    /// # Errors
    ///
    /// [`CopyRefused::Fenced`] if a newer owner exists; [`CopyRefused::Invalid`].
    pub fn keep_full(
        &self,
        epoch: u64,
        committed: u64,
        definition: RainDefinition,
        grants: Vec<Grant>,
        refunded_cents: Option<u64>,
    ) -> Result<Held, CopyRefused> {
        let rain_id = definition.rain_id.clone();
        let state = restore_state(definition, grants, refunded_cents)?;
        // The copies' lock is held from the fence check to the write, and a recovery takes
        // it to raise the fence: a write is either in the recovery's summary or refused.
        let mut copies = self.copies();
        self.check_fence(&rain_id, epoch, committed)?;
        let copy = Copy { epoch, state };
        let held = Held::of(&copy.state);
        // Under the lock, so the saved copy is never older than the one in memory.
        self.clear_grants(&rain_id);
        self.save_grants(&rain_id, 0, &copy.state.grants);
        self.save_header(&rain_id, &copy);
        copies.insert(rain_id, copy);
        Ok(held)
    }

    /// Adds grants `from ..` (and the refund) to the copy written at `epoch`.
    ///
    /// # Errors
    ///
    /// [`CopyRefused::Fenced`] if a newer owner exists; [`CopyRefused::OutOfStep`] if the
    /// copy is not at `epoch` or lacks grants before `from`.
    pub fn append(
        &self,
        rain_id: &str,
        epoch: u64,
        committed: u64,
        from: usize,
        grants: &[Grant],
        refunded_cents: Option<u64>,
    ) -> Result<Held, CopyRefused> {
        let mut copies = self.copies();
        self.check_fence(rain_id, epoch, committed)?;
        let Some(copy) = copies.get_mut(rain_id).filter(|c| c.epoch == epoch) else {
            return Err(CopyRefused::OutOfStep);
        };
        let before = copy.state.grants.len();
        copy.state
            .apply_grants(from, grants)
            .map_err(|_| CopyRefused::OutOfStep)?;
        let added = copy.state.grants.len() - before;
        if added > 0 {
            let new = &copy.state.grants[before..];
            self.save_grants(rain_id, before, new);
        }
        if refunded_cents.is_some() && copy.state.refunded_cents.is_none() {
            copy.state.refunded_cents = refunded_cents;
            self.save_header(rain_id, copy);
        }
        Ok(Held::of(&copy.state))
    }

    /// Raises the fence to `epoch` and summarises the copy held.
    pub fn recover(&self, rain_id: &str, epoch: u64) -> Option<CopySummary> {
        let copies = self.copies();
        self.raise_fence(rain_id, epoch);
        copies.get(rain_id).map(Copy::summary)
    }

    /// The copy held, summarised.
    pub fn summary(&self, rain_id: &str) -> Option<CopySummary> {
        self.copies().get(rain_id).map(Copy::summary)
    }

    /// Grants `from ..` of the copy held (at most [`APPEND_GRANTS_MAX`]).
    pub fn chunk(&self, rain_id: &str, from: usize) -> Option<CopyChunk> {
        self.copies().get(rain_id).map(|copy| {
            let grants = &copy.state.grants;
            let from = from.min(grants.len());
            let to = (from + APPEND_GRANTS_MAX).min(grants.len());
            CopyChunk {
                epoch: copy.epoch,
                definition: copy.state.definition.clone(),
                grants: grants[from..to].to_vec(),
                total: grants.len(),
                refunded_cents: copy.state.refunded_cents,
            }
        })
    }

    /// The whole copy held.
    pub fn state(&self, rain_id: &str) -> Option<(u64, RainState)> {
        self.copies()
            .get(rain_id)
            .map(|copy| (copy.epoch, copy.state.clone()))
    }
}

/// A request to a running pool.
enum PoolMsg {
    Grab {
        user: String,
        request_id: String,
        reply: oneshot::Sender<Result<RainGrabResponse, ErrorBody>>,
    },
    Acked {
        peer: NodeId,
        held: Held,
    },
    Fenced {
        fence: u64,
    },
    /// A flush of this node's disk that began after the own copy held `held` completed
    /// (or failed).
    Flushed {
        held: Held,
        result: Result<(), String>,
    },
}

/// A running pool, as the registry holds it.
#[derive(Clone)]
struct PoolHandle {
    epoch: u64,
    tx: mpsc::Sender<PoolMsg>,
    stop: CancellationToken,
}

/// The pools this node runs.
#[derive(Default)]
pub struct RainPools {
    pools: Mutex<HashMap<String, PoolHandle>>,
    /// One activation at a time per rain; other rains are not held up.
    activating: crate::server::common::keyed::KeyedLocks,
}

impl RainPools {
    fn map(&self) -> MutexGuard<'_, HashMap<String, PoolHandle>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, rain_id: &str) -> Option<PoolHandle> {
        self.map()
            .get(rain_id)
            .filter(|p| !p.stop.is_cancelled())
            .cloned()
    }

    /// Stops the pool of `rain_id` if it runs at an epoch below `epoch`.
    fn stop_below(&self, rain_id: &str, epoch: u64) {
        let mut pools = self.map();
        if matches!(pools.get(rain_id), Some(p) if p.epoch < epoch) {
            if let Some(pool) = pools.remove(rain_id) {
                pool.stop.cancel();
                tracing::info!(rain = %rain_id, epoch = pool.epoch, newer = epoch, "a newer owner took the rain; pool stopped");
            }
        }
    }
}

/// Red-packet rains on this node: the copies it holds and the pools it runs.
pub struct Rain {
    /// What the whole node shares.
    pub ctx: Arc<NodeContext>,
    /// The rooms (a rain announces in its room).
    pub rooms: Arc<Rooms>,
    /// Copies of red-packet rains (the pools' own included).
    pub rain_copies: RainCopies,
    /// The rain pools this node runs.
    pub rain_pools: RainPools,
    /// This, for tasks that outlive a call.
    pub this: Weak<Rain>,
}

impl Rain {
    /// The rains of a node, with the copies in `db`.
    ///
    /// # Errors
    ///
    /// sled's, opening the copies' trees.
    pub fn open(ctx: Arc<NodeContext>, rooms: Arc<Rooms>) -> Result<Arc<Rain>, sled::Error> {
        let rain_copies = RainCopies::open(&ctx.db)?;
        Ok(Arc::new_cyclic(|this| Rain {
            ctx,
            rooms,
            rain_copies,
            rain_pools: RainPools::default(),
            this: this.clone(),
        }))
    }

    /// Answers a request from another node about rains ([`Domain::Rain`]).
    pub(crate) async fn handle_peer(&self, message: Bytes) -> Bytes {
        match decode::<RainMessage>(&message) {
            Ok(message) => self.rain_message(message).await,
            Err(error) => encode(&Err::<(), _>(error)),
        }
    }
}

impl Stopping for Rain {
    fn stopping(&self) -> bool {
        self.ctx.shutdown.is_cancelled()
    }
}

/// A request to another node about rains.
fn rain_request(message: &RainMessage) -> Bytes {
    request(Domain::Rain, message)
}

fn unavailable(why: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::Unavailable, why)
}

fn now_ms() -> u64 {
    chorus_actors::room_actor::unix_now_ms()
}

/// The throttle factor for a rain: the share of taps clients send so that at most the
/// server's rate reaches the pool, from the room's audience.
pub fn throttle_factor(grabs_per_sec: u32, audience: u64) -> f64 {
    let offered = audience.max(1) as f64 * TAPS_PER_SEC_PER_CLIENT;
    (f64::from(grabs_per_sec.max(1)) / offered).clamp(0.001, 1.0)
}

fn response(rain_id: &str, outcome: &GrabOutcome, throttle: f64) -> RainGrabResponse {
    let (result, amount, packet) = match outcome {
        GrabOutcome::Granted { amount, packet } => {
            (GrabResult::Granted, Some(*amount), Some(*packet))
        }
        GrabOutcome::NoneLeft => (GrabResult::NoneLeft, None, None),
        GrabOutcome::CapReached => (GrabResult::CapReached, None, None),
        GrabOutcome::Throttled => (GrabResult::Throttled, None, None),
        GrabOutcome::NotStarted => (GrabResult::NotStarted, None, None),
        GrabOutcome::Ended => (GrabResult::Ended, None, None),
    };
    RainGrabResponse {
        rain_id: rain_id.to_string(),
        result,
        amount,
        packet,
        throttle,
    }
}

/// The ownership epoch of `rain_id` committed in this node's metadata (0 if none).
fn committed_epoch(node: &Rain, rain_id: &str) -> u64 {
    node.ctx.committed_epoch_of(&rain_key(rain_id))
}

/// The members a majority is counted over (all in the metadata, down ones included) and
/// the majority.
fn members_and_majority(node: &Rain) -> (Vec<NodeId>, usize) {
    let members: Vec<NodeId> = node.ctx.cluster.metadata().nodes.keys().copied().collect();
    let majority = members.len() / 2 + 1;
    (members, majority)
}

/// The rain's definition from the metadata.
fn definition(node: &Rain, rain_id: &str) -> Option<RainDefinition> {
    node.ctx
        .cluster
        .metadata()
        .definitions
        .get(&rain_key(rain_id))
        .and_then(|bytes| rmp_serde::from_slice(bytes).ok())
}

impl Rain {
    /// The owner of `rain_id`'s pool on this node's ring (this node if there is none).
    fn rain_owner(&self, rain_id: &str) -> NodeId {
        self.ctx.owner_of_key(&rain_key(rain_id))
    }

    /// A grab by `user`, served by the pool's owner (here or over the inter-node link;
    /// retried once on the new owner if the ring moved).
    pub(crate) async fn rain_grab(
        &self,
        rain_id: &str,
        user: &str,
        request_id: &str,
    ) -> Result<RainGrabResponse, ErrorBody> {
        if request_id.is_empty() || request_id.len() > chorus_actors::rain::REQUEST_ID_BYTES_MAX {
            return Err(ErrorBody::new(
                ErrorCode::InvalidArgument,
                format!(
                    "request_id must be 1 to {} bytes",
                    chorus_actors::rain::REQUEST_ID_BYTES_MAX
                ),
            ));
        }
        let mut result = Err(unavailable("no owner"));
        for _ in 0..2 {
            let owner = self.rain_owner(rain_id);
            result = if owner == self.ctx.cluster.node_id() {
                self.local_grab(rain_id, user, request_id).await
            } else {
                let message = rain_request(
                    &(RainMessage::Grab {
                        rain_id: rain_id.to_string(),
                        user: user.to_string(),
                        request_id: request_id.to_string(),
                    }),
                );
                match self.ctx.cluster.call_app(owner, message).await {
                    Ok(reply) => {
                        decode::<Result<RainGrabResponse, ErrorBody>>(&reply).and_then(|r| r)
                    }
                    Err(error) => Err(unavailable(format!(
                        "the rain's owner (node {owner}) is unreachable: {error}"
                    ))),
                }
            };
            if result.is_ok() || self.rain_owner(rain_id) == owner {
                break;
            }
        }
        result
    }

    /// A grab at the owner.
    async fn local_grab(
        &self,
        rain_id: &str,
        user: &str,
        request_id: &str,
    ) -> Result<RainGrabResponse, ErrorBody> {
        let pool = self.rain_pool(rain_id).await?;
        let (reply, answer) = oneshot::channel();
        let grab = PoolMsg::Grab {
            user: user.to_string(),
            request_id: request_id.to_string(),
            reply,
        };
        match pool.tx.try_send(grab) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("chorus_rain_grabs_total", "result" => "queue_full").increment(1);
                return Ok(RainGrabResponse {
                    rain_id: rain_id.to_string(),
                    result: GrabResult::Throttled,
                    amount: None,
                    packet: None,
                    throttle: 1.0,
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(unavailable("the rain's pool stopped; retry"));
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(unavailable("the rain's pool stopped; retry")))
    }

    /// The running pool of `rain_id`, activated if needed.
    async fn rain_pool(&self, rain_id: &str) -> Result<PoolHandle, ErrorBody> {
        if let Some(pool) = self.rain_pools.get(rain_id) {
            return Ok(pool);
        }
        let _one = self.rain_pools.activating.lock(rain_id).await;
        if let Some(pool) = self.rain_pools.get(rain_id) {
            return Ok(pool);
        }
        self.activate_rain(rain_id).await
    }

    /// Claims the pool, recovers the most advanced copy from a majority, and starts it.
    async fn activate_rain(&self, rain_id: &str) -> Result<PoolHandle, ErrorBody> {
        let definition = definition(self, rain_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::InvalidArgument, format!("no rain {rain_id:?}"))
        })?;
        let self_id = self.ctx.cluster.node_id();
        if self.rain_owner(rain_id) != self_id {
            return Err(unavailable("the rain moved to another node; retry"));
        }
        let claim = MetadataCommand::ClaimOwnership {
            key: rain_key(rain_id),
            node: self_id,
        };
        let epoch = match self.ctx.cluster.write(claim).await {
            Ok(MetadataResponse::OwnershipGranted(granted)) => granted.epoch,
            Ok(other) => return Err(unavailable(format!("rain ownership claim: {other:?}"))),
            Err(error) => return Err(unavailable(format!("rain ownership claim: {error}"))),
        };
        let (members, majority) = members_and_majority(self);
        let peers: Vec<NodeId> = self.ctx.live_peers();
        let queries = peers.iter().map(|&peer| {
            let message = rain_request(
                &(RainMessage::Recover {
                    rain_id: rain_id.to_string(),
                    epoch,
                }),
            );
            async move {
                let call = self.ctx.cluster.call_app(peer, message);
                match tokio::time::timeout(Duration::from_millis(RAIN_CALL_TIMEOUT_MS), call).await
                {
                    Ok(Ok(reply)) => decode::<Option<CopySummary>>(&reply)
                        .ok()
                        .map(|summary| (peer, summary)),
                    _ => None,
                }
            }
        });
        let mut answers: Vec<(NodeId, Option<CopySummary>)> =
            futures_util::future::join_all(queries)
                .await
                .into_iter()
                .flatten()
                .collect();
        answers.push((self_id, self.rain_copies.recover(rain_id, epoch)));
        if answers.len() < majority {
            return Err(unavailable(format!(
                "rain {rain_id:?}: {} of {} members answered; a majority ({majority}) is needed to continue it safely",
                answers.len(),
                members.len()
            )));
        }
        let best = answers
            .iter()
            .filter_map(|(node, summary)| summary.as_ref().map(|s| (*node, s.clone())))
            .max_by_key(|(_, s)| s.rank());
        let (grants, refunded_cents) = match best {
            None => (Vec::new(), None),
            Some((node, _)) if node == self_id => {
                let (_, state) = self.rain_copies.state(rain_id).ok_or_else(|| {
                    unavailable(format!("rain {rain_id:?}: the local copy vanished"))
                })?;
                (state.grants, state.refunded_cents)
            }
            Some((node, summary)) => (
                self.fetch_copy(node, rain_id, summary.grants).await?,
                summary.refunded_cents,
            ),
        };
        let committed = committed_epoch(self, rain_id);
        self.rain_copies
            .keep_full(epoch, committed, definition, grants, refunded_cents)
            .map_err(|e| unavailable(e.to_string()))?;
        let (_, state) = self
            .rain_copies
            .state(rain_id)
            .ok_or_else(|| unavailable("the local copy vanished"))?;
        let restored = state.grants.len();
        let ended_before = state.refunded_cents.is_some();
        let pool = RainPool::restore(state, self.ctx.config.rain.grabs_per_sec, now_ms());
        let (tx, rx) = mpsc::channel(POOL_QUEUE_MAX);
        let handle = PoolHandle {
            epoch,
            tx: tx.clone(),
            stop: self.ctx.shutdown.child_token(),
        };
        self.rain_pools
            .map()
            .insert(rain_id.to_string(), handle.clone());
        let task = PoolTask {
            node: self.this.clone(),
            rain_id: rain_id.to_string(),
            epoch,
            pool,
            rx,
            tx,
            stop: handle.stop.clone(),
            quorum: PoolQuorum::new(
                self.ctx.cluster.node_id(),
                members_and_majority(self).0,
                Held::default(),
            ),
            peers: HashMap::new(),
            wake: watch::channel(0).0,
            throttle: 1.0,
            started: false,
            // A rain that ended under an earlier owner was announced by it.
            ended_announced: ended_before,
        };
        tokio::spawn(task.run());
        tracing::info!(rain = %rain_id, epoch, restored, "rain pool activated");
        Ok(handle)
    }

    /// The grants of `node`'s copy, in chunks.
    async fn fetch_copy(
        &self,
        node: NodeId,
        rain_id: &str,
        total: usize,
    ) -> Result<Vec<Grant>, ErrorBody> {
        let mut grants: Vec<Grant> = Vec::with_capacity(total);
        while grants.len() < total {
            let message = rain_request(
                &(RainMessage::Fetch {
                    rain_id: rain_id.to_string(),
                    from: grants.len(),
                }),
            );
            let call = self.ctx.cluster.call_app(node, message);
            let chunk =
                match tokio::time::timeout(Duration::from_millis(RAIN_CALL_TIMEOUT_MS), call).await
                {
                    Ok(Ok(reply)) => decode::<Option<CopyChunk>>(&reply)?,
                    _ => None,
                };
            let Some(chunk) = chunk.filter(|c| !c.grants.is_empty()) else {
                return Err(unavailable(format!(
                    "rain {rain_id:?}: node {node} did not hand over its copy"
                )));
            };
            grants.extend(chunk.grants);
        }
        grants.truncate(total);
        Ok(grants)
    }

    /// Handles a rain message from another node.
    pub(crate) async fn rain_message(&self, message: RainMessage) -> bytes::Bytes {
        match message {
            RainMessage::Grab {
                rain_id,
                user,
                request_id,
            } => {
                if self.rain_owner(&rain_id) != self.ctx.cluster.node_id() {
                    return encode(&Err::<RainGrabResponse, _>(unavailable(
                        "this node does not own the rain; retry",
                    )));
                }
                encode(&self.local_grab(&rain_id, &user, &request_id).await)
            }
            RainMessage::Recover { rain_id, epoch } => {
                let summary = self.rain_copies.recover(&rain_id, epoch);
                self.rain_pools.stop_below(&rain_id, epoch);
                encode(&summary)
            }
            RainMessage::Fetch { rain_id, from } => encode(&self.rain_copies.chunk(&rain_id, from)),
            RainMessage::Full {
                rain_id,
                epoch,
                definition,
                grants,
                refunded_cents,
            } => {
                let result = if definition.rain_id == rain_id {
                    self.rain_copies.keep_full(
                        epoch,
                        committed_epoch(self, &rain_id),
                        definition,
                        grants,
                        refunded_cents,
                    )
                } else {
                    Err(CopyRefused::Invalid(
                        "the definition names another rain".into(),
                    ))
                };
                self.rain_pools.stop_below(&rain_id, epoch);
                encode(&Ok::<_, ErrorBody>(result))
            }
            RainMessage::Append {
                rain_id,
                epoch,
                from,
                grants,
                refunded_cents,
            } => {
                let grants = &grants[..grants.len().min(APPEND_GRANTS_MAX)];
                let result = self.rain_copies.append(
                    &rain_id,
                    epoch,
                    committed_epoch(self, &rain_id),
                    from,
                    grants,
                    refunded_cents,
                );
                self.rain_pools.stop_below(&rain_id, epoch);
                encode(&Ok::<_, ErrorBody>(result))
            }
        }
    }

    /// The most advanced copy of `rain_id` among the live nodes (for the audit and the
    /// status), without fencing anyone.
    pub(crate) async fn rain_best_copy(
        &self,
        rain_id: &str,
    ) -> Result<Option<(u64, RainState)>, ErrorBody> {
        let self_id = self.ctx.cluster.node_id();
        let mut best: Option<(NodeId, CopySummary)> = self
            .rain_copies
            .summary(rain_id)
            .map(|summary| (self_id, summary));
        for peer in self.ctx.live_peers() {
            let message = rain_request(
                &(RainMessage::Fetch {
                    rain_id: rain_id.to_string(),
                    from: usize::MAX,
                }),
            );
            let call = self.ctx.cluster.call_app(peer, message);
            let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_millis(RAIN_CALL_TIMEOUT_MS), call).await
            else {
                continue;
            };
            let Ok(Some(chunk)) = decode::<Option<CopyChunk>>(&reply) else {
                continue;
            };
            let summary = CopySummary {
                epoch: chunk.epoch,
                grants: chunk.total,
                refunded_cents: chunk.refunded_cents,
            };
            if best.as_ref().is_none_or(|(_, b)| summary.rank() > b.rank()) {
                best = Some((peer, summary));
            }
        }
        let Some((node, summary)) = best else {
            return Ok(None);
        };
        if node == self_id {
            return Ok(self.rain_copies.state(rain_id));
        }
        let grants = self.fetch_copy(node, rain_id, summary.grants).await?;
        let definition = definition(self, rain_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::InvalidArgument, format!("no rain {rain_id:?}"))
        })?;
        restore_state(definition, grants, summary.refunded_cents)
            .map(|state| Some((summary.epoch, state)))
            .map_err(|e| unavailable(e.to_string()))
    }
}

/// How the pool answers one grab: the response, once its grant is on a majority.
type GrabReply = (
    RainGrabResponse,
    oneshot::Sender<Result<RainGrabResponse, ErrorBody>>,
);

/// The pool actor: serves grabs in order, one at a time; replication runs beside it.
struct PoolTask {
    node: Weak<Rain>,
    rain_id: String,
    epoch: u64,
    pool: RainPool,
    rx: mpsc::Receiver<PoolMsg>,
    tx: mpsc::Sender<PoolMsg>,
    stop: CancellationToken,
    /// Which grabs are on a majority (`chorus_actors::rain_quorum`).
    quorum: PoolQuorum<GrabReply>,
    /// Replication tasks per member.
    peers: HashMap<NodeId, CancellationToken>,
    /// Bumped when the local copy grows.
    wake: watch::Sender<u64>,
    throttle: f64,
    started: bool,
    ended_announced: bool,
}

impl PoolTask {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.reconcile_peers();
        let written = self.quorum.written(Held::of(self.pool.state()));
        self.execute(written);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                message = self.rx.recv() => match message {
                    Some(message) => {
                        if !self.handle(message) {
                            break;
                        }
                        // Take what else is queued before answering (a group commit).
                        while let Ok(message) = self.rx.try_recv() {
                            if !self.handle(message) {
                                self.stop.cancel();
                                break;
                            }
                        }
                        self.answer_committed();
                    }
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
            }
        }
        self.stop.cancel();
        for (_, peer) in self.peers.drain() {
            peer.cancel();
        }
        for (_, reply) in self.quorum.drain() {
            let _ = reply.send(Err(unavailable("the rain's pool stopped; retry")));
        }
        if let Some(node) = self.node.upgrade() {
            let mut pools = node.rain_pools.map();
            if matches!(pools.get(&self.rain_id), Some(p) if p.epoch == self.epoch) {
                pools.remove(&self.rain_id);
            }
        }
        tracing::info!(rain = %self.rain_id, epoch = self.epoch, "rain pool stopped");
    }

    /// Handles one message; false to stop.
    fn handle(&mut self, message: PoolMsg) -> bool {
        match message {
            PoolMsg::Grab {
                user,
                request_id,
                reply,
            } => {
                let now = now_ms();
                let before = self.pool.state().grants.len();
                let outcome = self.pool.grab(now, &user, &request_id);
                let label = match &outcome {
                    GrabOutcome::Granted { .. } => "granted",
                    GrabOutcome::NoneLeft => "none_left",
                    GrabOutcome::CapReached => "cap_reached",
                    GrabOutcome::Throttled => "throttled",
                    GrabOutcome::NotStarted => "not_started",
                    GrabOutcome::Ended => "ended",
                };
                metrics::counter!("chorus_rain_grabs_total", "result" => label).increment(1);
                if self.pool.state().grants.len() > before && !self.persist(before) {
                    let _ = reply.send(Err(unavailable("the rain moved to a newer owner")));
                    return false;
                }
                let response = response(&self.rain_id, &outcome, self.throttle);
                match outcome {
                    GrabOutcome::Granted { packet, .. } => self.quorum.granted(
                        packet as usize,
                        now + GRAB_COMMIT_TIMEOUT_MS,
                        (response, reply),
                    ),
                    _ => {
                        let _ = reply.send(Ok(response));
                    }
                }
                true
            }
            PoolMsg::Acked { peer, held } => {
                self.quorum.acked(peer, held);
                true
            }
            PoolMsg::Fenced { fence } => {
                tracing::warn!(rain = %self.rain_id, epoch = self.epoch, fence, "a newer owner fenced this pool");
                false
            }
            PoolMsg::Flushed { held, result } => {
                let confirmed = match result {
                    Ok(()) => Some(held),
                    // Grabs wait; the next batch or tick tries again.
                    Err(error) => {
                        tracing::warn!(rain = %self.rain_id, %error, "the pool's own copy was not flushed");
                        None
                    }
                };
                let commands = self.quorum.flushed(confirmed);
                self.execute(commands);
                true
            }
        }
    }

    /// Carries out what the quorum asks: answer or refuse grabs, flush the own copy (on a
    /// node with no other member, one flush at a time; the node's group commit shares it
    /// with every other writer; the answer comes back as [`PoolMsg::Flushed`]).
    fn execute(&mut self, commands: Vec<QuorumCommand<GrabReply>>) {
        for command in commands {
            match command {
                QuorumCommand::Answer((response, reply)) => {
                    let _ = reply.send(Ok(response));
                }
                QuorumCommand::TimedOut((_, reply)) => {
                    metrics::counter!("chorus_rain_grabs_total", "result" => "not_replicated")
                        .increment(1);
                    let _ = reply.send(Err(unavailable(
                        "the grant did not reach a majority of nodes in time; retry with the same request_id",
                    )));
                }
                QuorumCommand::FlushOwn(held) => {
                    let Some(node) = self.node.upgrade() else {
                        continue;
                    };
                    let commit = node.ctx.group_commit.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let result = commit.durable().await.map_err(|e| e.to_string());
                        let _ = tx.send(PoolMsg::Flushed { held, result }).await;
                    });
                }
            }
        }
    }

    /// Writes the grants from `from` (and the refund) to the local copy and wakes the
    /// replication tasks; false if this pool is fenced.
    fn persist(&mut self, from: usize) -> bool {
        let Some(node) = self.node.upgrade() else {
            return false;
        };
        let state = self.pool.state();
        let written = node.rain_copies.append(
            &self.rain_id,
            self.epoch,
            committed_epoch(&node, &self.rain_id),
            from,
            &state.grants[from..],
            state.refunded_cents,
        );
        match written {
            Ok(_) => {
                self.wake.send_modify(|v| *v += 1);
                let commands = self.quorum.written(Held::of(self.pool.state()));
                self.execute(commands);
                true
            }
            Err(error) => {
                tracing::warn!(rain = %self.rain_id, %error, "cannot write the pool's own copy");
                false
            }
        }
    }

    /// Answers the grabs whose grants are on a majority, refuses those past their
    /// deadline (with the members as the metadata has them now).
    fn answer_committed(&mut self) {
        if let Some(node) = self.node.upgrade() {
            self.quorum.members(members_and_majority(&node).0);
        }
        let commands = self.quorum.tick(now_ms());
        self.execute(commands);
    }

    /// Starts or stops replication tasks as members come and go.
    fn reconcile_peers(&mut self) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let self_id = node.ctx.cluster.node_id();
        let (members, _) = members_and_majority(&node);
        self.peers.retain(|id, stop| {
            let keep = members.contains(id);
            if !keep {
                stop.cancel();
            }
            keep
        });
        self.quorum.members(members.iter().copied());
        for peer in members.into_iter().filter(|id| *id != self_id) {
            if self.peers.contains_key(&peer) {
                continue;
            }
            let stop = self.stop.child_token();
            self.peers.insert(peer, stop.clone());
            tokio::spawn(replicate_to(
                self.node.clone(),
                self.rain_id.clone(),
                self.epoch,
                peer,
                self.wake.subscribe(),
                self.tx.clone(),
                stop,
            ));
        }
    }

    async fn on_tick(&mut self) {
        self.reconcile_peers();
        self.answer_committed();
        let Some(node) = self.node.upgrade() else {
            self.stop.cancel();
            return;
        };
        if node.rain_owner(&self.rain_id) != node.ctx.cluster.node_id() {
            tracing::info!(rain = %self.rain_id, "the rain moved to another node; pool stopping");
            self.stop.cancel();
            return;
        }
        let now = now_ms();
        let definition = self.pool.state().definition.clone();
        if !self.started && now >= definition.start_ms && now < definition.end_ms() {
            self.started = true;
            let audience = node.rooms.room_audience(&definition.room_id).await;
            self.throttle = throttle_factor(node.ctx.config.rain.grabs_per_sec, audience);
            let event = Event::RainStart(RainStartEvent {
                room_id: definition.room_id.clone(),
                rain_id: self.rain_id.clone(),
                count: definition.count,
                start_ms: definition.start_ms,
                end_ms: definition.end_ms(),
                throttle: self.throttle,
            });
            announce(&node, &definition.room_id, &event);
            tracing::info!(rain = %self.rain_id, audience, throttle = self.throttle, "rain started");
        }
        if now >= definition.end_ms() && self.pool.state().refunded_cents.is_none() {
            let before = self.pool.state().grants.len();
            let refunded = self.pool.finish();
            if !self.persist(before) {
                self.stop.cancel();
                return;
            }
            tracing::info!(rain = %self.rain_id, refunded, "rain ended; unclaimed cents refunded");
        }
        if self.ended_announced
            && self.quorum.pending() == 0
            && now >= definition.end_ms().saturating_add(IDLE_AFTER_END_MS)
        {
            // Nothing left to do but answer late grabs, which re-activate it.
            tracing::info!(rain = %self.rain_id, "rain over; pool stopping");
            self.stop.cancel();
            return;
        }
        if !self.ended_announced && self.pool.state().refunded_cents.is_some() {
            let (grants, refunded) = self.quorum.committed();
            if refunded && grants >= self.pool.state().grants.len() {
                self.ended_announced = true;
                let state = self.pool.state();
                let event = Event::RainEnded(RainEndedEvent {
                    room_id: definition.room_id.clone(),
                    rain_id: self.rain_id.clone(),
                    granted: state.grants.len() as u64,
                    granted_cents: state.grants.iter().map(|g| g.amount).sum(),
                    refunded_cents: state.refunded_cents.unwrap_or(0),
                });
                if !self.started {
                    // Ended before this owner announced a start: nothing to say to clients
                    // beyond the end.
                    self.started = true;
                }
                announce(&node, &definition.room_id, &event);
                export_ledger(&node, state);
            }
        }
    }
}

/// Announces `event` to the room in the background.
fn announce(node: &Arc<Rain>, room_id: &str, event: &Event) {
    let body = match event.encode_body() {
        Ok(body) => Arc::new(body),
        Err(error) => {
            tracing::error!(%error, "cannot encode a rain event");
            return;
        }
    };
    let node = node.clone();
    let room_id = room_id.to_string();
    tokio::spawn(async move {
        if let Err(error) = node.rooms.announce(&room_id, body).await {
            tracing::warn!(room = %room_id, error = %error.message, "rain event not announced");
        }
    });
}

/// One line of a rain's ledger.
#[derive(Debug, Serialize)]
struct LedgerLine<'a> {
    rain_id: &'a str,
    kind: &'a str,
    user: &'a str,
    amount: u64,
    at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    packet: Option<u32>,
}

/// The ledger as JSON lines: one per grant, then the refund.
pub fn ledger_lines(state: &RainState) -> Vec<String> {
    let rain_id = &state.definition.rain_id;
    let mut lines: Vec<String> = state
        .grants
        .iter()
        .map(|grant| LedgerLine {
            rain_id,
            kind: "grant",
            user: &grant.user,
            amount: grant.amount,
            at_ms: grant.at_ms,
            packet: Some(grant.packet),
        })
        .chain(state.refunded_cents.map(|refund| LedgerLine {
            rain_id,
            kind: "refund",
            user: &state.definition.creator,
            amount: refund,
            at_ms: state.definition.end_ms(),
            packet: None,
        }))
        .filter_map(|line| serde_json::to_string(&line).ok())
        .collect();
    lines.shrink_to_fit();
    lines
}

/// Writes the ledger to `<data dir>/analytics/rain-<id>.ledger.jsonl` (on the blocking pool).
fn export_ledger(node: &Arc<Rain>, state: &RainState) {
    let dir = node.ctx.config.data_dir.join("analytics");
    let path = dir.join(format!("rain-{}.ledger.jsonl", state.definition.rain_id));
    let mut text = ledger_lines(state).join("\n");
    text.push('\n');
    tokio::task::spawn_blocking(move || {
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)
        });
        match written {
            Ok(()) => tracing::info!(path = %path.display(), "rain ledger exported"),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot export a rain ledger")
            }
        }
    });
}

/// Sends `peer` what it lacks of the pool's copy, for as long as the pool runs.
async fn replicate_to(
    node: Weak<Rain>,
    rain_id: String,
    epoch: u64,
    peer: NodeId,
    mut wake: watch::Receiver<u64>,
    pool: mpsc::Sender<PoolMsg>,
    stop: CancellationToken,
) {
    // What the peer holds at this epoch; None until it has taken a Full.
    let mut held: Option<Held> = None;
    let mut backoff_ms = 50;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let Some(summary) = node.rain_copies.summary(&rain_id) else {
            return;
        };
        if summary.epoch != epoch {
            return;
        }
        let local = Held {
            grants: summary.grants,
            refunded: summary.refunded_cents.is_some(),
        };
        if held == Some(local) {
            drop(node);
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = wake.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let message = match held {
            None => {
                let Some(chunk) = node.rain_copies.chunk(&rain_id, 0) else {
                    return;
                };
                RainMessage::Full {
                    rain_id: rain_id.clone(),
                    epoch,
                    definition: chunk.definition,
                    grants: chunk.grants,
                    refunded_cents: if chunk.total <= APPEND_GRANTS_MAX {
                        chunk.refunded_cents
                    } else {
                        None
                    },
                }
            }
            Some(peer_held) => {
                let Some(chunk) = node.rain_copies.chunk(&rain_id, peer_held.grants) else {
                    return;
                };
                RainMessage::Append {
                    rain_id: rain_id.clone(),
                    epoch,
                    from: peer_held.grants,
                    refunded_cents: if peer_held.grants + chunk.grants.len() >= chunk.total {
                        chunk.refunded_cents
                    } else {
                        None
                    },
                    grants: chunk.grants,
                }
            }
        };
        let call = node.ctx.cluster.call_app(peer, rain_request(&(message)));
        let answer = tokio::time::timeout(Duration::from_millis(RAIN_CALL_TIMEOUT_MS), call).await;
        drop(node);
        match answer {
            Ok(Ok(reply)) => match decode::<Result<Result<Held, CopyRefused>, ErrorBody>>(&reply)
                .and_then(|r| r)
            {
                Ok(Ok(now_held)) => {
                    backoff_ms = 50;
                    held = Some(now_held);
                    if pool
                        .send(PoolMsg::Acked {
                            peer,
                            held: now_held,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Ok(Err(CopyRefused::Fenced(fence))) => {
                    let _ = pool.send(PoolMsg::Fenced { fence }).await;
                    return;
                }
                Ok(Err(CopyRefused::OutOfStep)) => {
                    held = None;
                    continue;
                }
                Ok(Err(refused @ CopyRefused::Invalid(_))) => {
                    tracing::warn!(rain = %rain_id, peer, %refused, "rain replication refused");
                }
                Err(error) => {
                    tracing::debug!(rain = %rain_id, peer, error = %error.message, "rain replication refused");
                }
            },
            Ok(Err(error)) => {
                tracing::debug!(rain = %rain_id, peer, %error, "rain replication failed");
            }
            Err(_) => tracing::debug!(rain = %rain_id, peer, "rain replication timed out"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
        }
        backoff_ms = (backoff_ms * 2).min(1_000);
    }
}

/// Activates the pools of the rains this node owns that start soon or have not ended, so
/// that starts are announced and ends refunded on time. (A pool stops itself when its rain
/// moves away, and with the node: its stop token is a child of the node's shutdown.)
pub(crate) async fn run_rains(node: Weak<Rain>) {
    let mut ticker = crate::server::context::NodeTicker::new(node, Duration::from_millis(500));
    while let Some(node) = ticker.next().await {
        let self_id = node.ctx.cluster.node_id();
        let now = now_ms();
        let due: Vec<String> = node
            .ctx
            .cluster
            .metadata()
            .definitions
            .iter()
            .filter_map(|(key, bytes)| {
                let rain_id = ActorKey::parse(key)?.rain()?;
                let definition: RainDefinition = rmp_serde::from_slice(bytes).ok()?;
                let soon = now + ACTIVATE_AHEAD_MS >= definition.start_ms;
                let finished = node
                    .rain_copies
                    .summary(rain_id)
                    .is_some_and(|s| s.refunded_cents.is_some());
                (soon && !finished).then(|| rain_id.to_string())
            })
            .filter(|rain_id| node.rain_owner(rain_id) == self_id)
            .filter(|rain_id| node.rain_pools.get(rain_id).is_none())
            .collect();
        for rain_id in due {
            if let Err(error) = node.rain_pool(&rain_id).await {
                tracing::debug!(rain = %rain_id, error = %error.message, "rain pool not activated yet");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(total: u64, count: u32) -> RainDefinition {
        RainDefinition {
            rain_id: "rain-t".into(),
            room_id: "r".into(),
            creator: "host".into(),
            total_cents: total,
            count,
            start_ms: 0,
            duration_ms: 60_000,
            cap_per_user: 3,
            seed: 7,
        }
    }

    fn grant(packet: u32, amount: u64) -> Grant {
        Grant {
            packet,
            user: format!("u{packet}"),
            request_id: format!("q{packet}"),
            amount,
            at_ms: 1,
        }
    }

    #[test]
    fn copies_are_fenced_follow_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def = definition(1_000, 10);
        let packets = chorus_actors::rain::split(1_000, 10, 7).expect("split");
        {
            let db = sled::open(dir.path()).expect("open");
            let copies = RainCopies::open(&db).expect("copies");
            let held = copies
                .keep_full(2, 0, def.clone(), vec![grant(0, packets[0])], None)
                .expect("full");
            assert_eq!(held.grants, 1);
            // In order: a gap is out of step, a repeat is skipped.
            assert_eq!(
                copies.append("rain-t", 2, 0, 3, &[grant(3, packets[3])], None),
                Err(CopyRefused::OutOfStep)
            );
            let grants = [grant(0, packets[0]), grant(1, packets[1])];
            assert_eq!(
                copies.append("rain-t", 2, 0, 0, &grants, None),
                Ok(Held {
                    grants: 2,
                    refunded: false
                })
            );
            // Another epoch's append is out of step; an older one is fenced.
            assert_eq!(
                copies.append("rain-t", 3, 0, 2, &[grant(2, packets[2])], None),
                Err(CopyRefused::OutOfStep)
            );
            assert_eq!(copies.recover("rain-t", 5).map(|s| s.grants), Some(2));
            assert_eq!(
                copies.append("rain-t", 2, 0, 2, &[grant(2, packets[2])], None),
                Err(CopyRefused::Fenced(5))
            );
            // The committed ownership fences too.
            assert!(matches!(
                copies.keep_full(5, 6, def.clone(), Vec::new(), None),
                Err(CopyRefused::Fenced(6))
            ));
            copies
                .append("rain-t", 2, 0, 2, &[], Some(5))
                .expect_err("fenced");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(error) => {
                    assert!(std::time::Instant::now() < deadline, "reopen: {error}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let copies = RainCopies::open(&db).expect("copies");
        let (epoch, state) = copies.state("rain-t").expect("kept");
        assert_eq!(epoch, 2);
        assert_eq!(state.grants.len(), 2);
        assert_eq!(state.packets, packets);
        assert_eq!(copies.fence_of("rain-t"), 5);
    }

    #[test]
    fn the_throttle_lets_about_the_server_rate_through() {
        assert_eq!(throttle_factor(20_000, 10), 1.0);
        let factor = throttle_factor(20_000, 1_000_000);
        assert!((factor - 0.004).abs() < 1e-9, "{factor}");
        assert!(throttle_factor(1, u64::MAX) >= 0.001);
    }

    #[test]
    fn the_ledger_lists_grants_then_the_refund() {
        let mut pool = RainPool::create(definition(1_000, 10), 1_000, 0).expect("pool");
        pool.grab(1, "ann", "a");
        pool.grab(2, "bob", "b");
        let refund = pool.finish();
        let lines = ledger_lines(pool.state());
        assert_eq!(lines.len(), 3);
        let last: serde_json::Value = serde_json::from_str(&lines[2]).expect("json");
        assert_eq!(last["kind"], "refund");
        assert_eq!(last["user"], "host");
        assert_eq!(last["amount"], refund);
        let sum: u64 = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["amount"]
                    .as_u64()
                    .expect("amount")
            })
            .sum();
        assert_eq!(sum, 1_000);
    }
}
