//! Live quiz shows on the cluster (SPEC Q1-Q5): the show's controller, its answer shards,
//! and the answer path between them. The rules are `chorus_actors::quiz`; this module
//! places them and moves messages.
//!
//! - **Definition** (Raft, `quiz/<id>`): the questions with their right options, the
//!   prize, the window, revive cards, and the number of answer shards. Every node has it;
//!   it never goes to clients.
//! - **Controller** (the ring owner of `quiz/<id>`): serializes the operator's actions
//!   (push, announce, finish). Each transition is committed in Raft first (`quiz/<id>/state`:
//!   phase, one random 32-byte key per pushed question, per-question counts, the payout),
//!   then told to every live node (`QuizPhase`), then broadcast to the room with
//!   [`Rooms::announce`] (one notice through the room's owner). So a controller that dies
//!   loses nothing: the next owner of the key reads the committed state.
//! - **Answer shards** (the ring owner of `quiz/<id>/shard/<s>`, user → `s` by
//!   `chorus_actors::quiz::shard_of`): judge answers at once against the open question
//!   known on that node, seal the verdict with the question's key, and, at the
//!   announcement, eliminate who did not answer and report per-option counts. More nodes
//!   hold more shards, so answer throughput grows with the cluster.
//! - **Edges**: a `quiz.answer` goes from the viewer's node to its shard's owner in
//!   batches (one queue and sender task per destination node, at most
//!   [`ANSWER_BATCH_MAX`] answers per message, [`ANSWER_BATCHES_IN_FLIGHT_MAX`] messages
//!   in flight); the sealed verdict comes back as the response and as a `quiz.result`
//!   notice to the answering session.
//!
//! **Invariant:** the right option and a question's key leave the servers only in the
//! `quiz.announce` of that question, after its deadline; before it a viewer holds only its
//! sealed verdict (ChaCha20-Poly1305, padded to one length).
//!
//! **Boundary (durability):** a shard's state lives in the memory of its owner and of one
//! replica (the ring's next node for the shard key), which takes each judged viewer before
//! the verdict is answered. A node that becomes a shard's owner merges what it holds with
//! the copies of every live node. There is no ownership fencing for shards (unlike rooms):
//! while a ring change is under way two nodes can judge the same viewer; the copy with
//! more verdicts wins the merge. In a cluster shard state is not written to disk. A node
//! with no other member (no replica candidate) writes the judged viewers to its sled tree
//! [`SAVED_VIEWERS_TREE`] and waits for the node's group-committed flush
//! (`common::group_commit`) before it answers; a shard it creates again (after a restart)
//! starts from what that tree holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use chorus_actors::quiz::{shard_of, AnswerShard, QuizDefinition, QuizError, Viewer};
use chorus_actors::quiz_control::{
    judge, needs_committed_state, ControlStep, Gather, JudgeRefusal, Notice, QuizControl,
};
use chorus_actors::room_actor::{unix_now_ms, MemberSink as _};
use chorus_cluster::metadata::{MetadataCommand, MetadataResponse, NodeId};
use chorus_protocol::sealed::{from_hex, seal_verdict, to_hex, SEAL_KEY_BYTES};
use chorus_protocol::{
    ErrorBody, ErrorCode, Event, QuizAnnounceEvent, QuizAnswerRequest, QuizFinishedEvent,
    QuizQuestionEvent, QuizResultEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::server::common::codec::{decode, encode, request, Domain};
use crate::server::context::NodeContext;
use crate::server::rooms::service::Rooms;
use crate::server::sessions::session::Session;

/// Answer shards of a new show, unless its creator asks for another number.
pub const SHARDS_DEFAULT: u32 = 16;
/// Most answer shards of a show.
pub const SHARDS_MAX: u32 = 1_024;
/// Most answer shards (of all shows) one node holds, as owner or replica.
pub const SHARDS_HELD_MAX: usize = 65_536;
/// Most shows whose definition and state a node keeps decoded.
pub const SHOWS_CACHED_MAX: usize = 4_096;
/// Answers queued toward one shard-owning node before new ones are refused.
pub const ANSWER_QUEUE_MAX: usize = 65_536;
/// Answers in one inter-node message.
pub const ANSWER_BATCH_MAX: usize = 512;
/// Answer messages in flight toward one node.
pub const ANSWER_BATCHES_IN_FLIGHT_MAX: usize = 8;
/// Time a shard owner has to judge a batch of answers.
pub const ANSWER_CALL_TIMEOUT_MS: u64 = 5_000;
/// Time each node has to take a new phase, close shards or list survivors.
pub const QUIZ_PEER_TIMEOUT_MS: u64 = 3_000;
/// Time a replica has to take judged viewers.
pub const QUIZ_REPLICATE_TIMEOUT_MS: u64 = 1_000;

pub use crate::server::common::keys::{
    quiz_key, quiz_shard_key as shard_key, quiz_state_key as state_key,
};

/// A show as stored in Raft under [`quiz_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuizRecord {
    /// The show.
    pub definition: QuizDefinition,
    /// Its answer shards (fixed for its life: users stay in theirs).
    pub shards: u32,
}

/// A show's progress as stored in Raft under [`state_key`], written by its controller.
pub use chorus_actors::quiz_control::QuizState;

/// An operator action, run by the show's controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QuizAction {
    /// Open the next question.
    Push,
    /// Announce the open question's answer (after its deadline).
    Announce,
    /// Split the prize among the survivors (after the last announcement).
    Finish,
    /// The show's phase and counts.
    Status,
    /// Winners and amounts; with a user, its history.
    Results {
        /// Whose history.
        user: Option<String>,
    },
}

/// One answer on its way to its shard's owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnswerItem {
    /// The show.
    pub quiz_id: String,
    /// The user's shard.
    pub shard: u32,
    /// The viewer.
    pub user: String,
    /// The question.
    pub question: u32,
    /// The option.
    pub option: u8,
}

/// Work on a node's answer shards, asked by the controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardOp {
    /// Close `question` on these shards (eliminate who did not answer); answered with the
    /// summed counts.
    Close {
        /// The show.
        quiz_id: String,
        /// The question.
        question: u32,
        /// Its options.
        options: u8,
        /// The shards.
        shards: Vec<u32>,
    },
    /// The users on these shards who passed all `questions`.
    Survivors {
        /// The show.
        quiz_id: String,
        /// Questions in the show.
        questions: u32,
        /// The shards.
        shards: Vec<u32>,
    },
    /// One viewer's state.
    History {
        /// The show.
        quiz_id: String,
        /// The viewer's shard.
        shard: u32,
        /// The viewer.
        user: String,
    },
    /// Judged viewers from the shard's owner, for its replica (answered with `Done`).
    Replicate {
        /// The show.
        quiz_id: String,
        /// The shard.
        shard: u32,
        /// Their states.
        viewers: Vec<(String, Viewer)>,
    },
    /// Everything held of a shard (for a new owner).
    Copy {
        /// The show.
        quiz_id: String,
        /// The shard.
        shard: u32,
    },
}

/// The answer to a [`ShardOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardReply {
    /// Answers in time per option.
    Counts(Vec<u64>),
    /// User ids.
    Survivors(Vec<String>),
    /// A viewer's state, if the shard knows it.
    History(Option<Viewer>),
    /// The viewers held.
    Viewers(Vec<(String, Viewer)>),
    /// Done.
    Done,
}

type Verdicts = Vec<Result<String, ErrorBody>>;

/// One answer shard held here, behind its own lock (answers to other shards do not wait).
type HeldShard = Arc<Mutex<AnswerShard>>;

struct Pending {
    item: AnswerItem,
    reply: oneshot::Sender<Result<String, ErrorBody>>,
}

/// The sled tree where a node with no other member keeps its judged viewers, keyed by
/// show, shard and user.
pub const SAVED_VIEWERS_TREE: &str = "quiz/viewers";

/// A node's quiz state: decoded shows, the answer shards it holds, its answer queues.
#[derive(Default)]
pub struct QuizService {
    /// Judged viewers saved by a node with no other member ([`SAVED_VIEWERS_TREE`]).
    saved: Option<sled::Tree>,
    records: Mutex<HashMap<String, Arc<QuizRecord>>>,
    states: Mutex<HashMap<String, Arc<QuizState>>>,
    shards: Mutex<HashMap<(String, u32), HeldShard>>,
    /// Serializes operator actions on each show this node controls (shows do not wait
    /// for each other).
    control: crate::server::common::keyed::KeyedLocks,
    batchers: Mutex<HashMap<NodeId, mpsc::Sender<Pending>>>,
}

/// Quiz shows on this node: the shows it controls, the answer shards it holds, its
/// answer queues.
pub struct Quiz {
    /// What the whole node shares.
    pub ctx: Arc<NodeContext>,
    /// The rooms (a show announces in its room).
    pub rooms: Arc<Rooms>,
    /// Decoded definitions, answer shards held here, answer queues.
    pub quiz: QuizService,
    /// This, for tasks that outlive a call.
    pub this: Weak<Quiz>,
}

impl Quiz {
    /// The quizzes of a node, with saved viewers in its database.
    ///
    /// # Errors
    ///
    /// sled's, opening the tree of saved viewers.
    pub fn open(ctx: Arc<NodeContext>, rooms: Arc<Rooms>) -> Result<Arc<Quiz>, sled::Error> {
        let quiz = QuizService::open(&ctx.db)?;
        Ok(Arc::new_cyclic(|this| Quiz {
            ctx,
            rooms,
            quiz,
            this: this.clone(),
        }))
    }

    /// Answers a request from another node about quizzes ([`Domain::Quiz`]).
    pub(crate) async fn handle_peer(&self, message: Bytes) -> Bytes {
        match decode::<QuizMessage>(&message) {
            Ok(QuizMessage::Answers { answers }) => {
                let answers = answers.into_iter().take(ANSWER_BATCH_MAX).collect();
                encode(&self.quiz_judge(answers).await)
            }
            Ok(QuizMessage::Shards(op)) => encode(&self.quiz_shard_op(op).await),
            Ok(QuizMessage::Control { quiz_id, action }) => {
                encode(&self.quiz_control(&quiz_id, action).await)
            }
            Ok(QuizMessage::Phase { quiz_id, state }) => {
                self.quiz_phase_seen(&quiz_id, &state);
                encode(&Ok::<(), ErrorBody>(()))
            }
            Err(error) => encode(&Err::<(), _>(error)),
        }
    }
}

/// A message between nodes about quizzes ([`Domain::Quiz`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum QuizMessage {
    /// Quiz answers for shards this node owns (answered with one
    /// `Result<String, ErrorBody>` per answer, in order: the sealed verdict or a refusal).
    Answers {
        /// At most [`ANSWER_BATCH_MAX`].
        answers: Vec<AnswerItem>,
    },
    /// Work on this node's quiz shards (answered with `Result<ShardReply, ErrorBody>`).
    Shards(ShardOp),
    /// An operator action for a show this node controls (answered with
    /// `Result<String, ErrorBody>`, the JSON text of the result).
    Control {
        /// The show.
        quiz_id: String,
        /// What to do.
        action: QuizAction,
    },
    /// A show's new committed state, from its controller (answered with `Ok`).
    Phase {
        /// The show.
        quiz_id: String,
        /// The `QuizState`, MessagePack.
        state: Bytes,
    },
}

/// A request to another node about quizzes.
fn quiz_request(message: &QuizMessage) -> Bytes {
    request(Domain::Quiz, message)
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

fn phase_error(e: QuizError) -> ErrorBody {
    error(ErrorCode::InvalidArgument, e.to_string())
}

/// The key prefix of a shard's saved viewers: show, a zero byte, the shard number.
fn saved_shard_prefix(quiz_id: &str, shard: u32) -> Vec<u8> {
    let mut key = quiz_id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&shard.to_be_bytes());
    key
}

impl QuizService {
    /// A service whose saved viewers live in `db`.
    ///
    /// # Errors
    ///
    /// sled's, opening the tree.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(QuizService {
            saved: Some(db.open_tree(SAVED_VIEWERS_TREE)?),
            ..QuizService::default()
        })
    }

    /// Writes judged viewers of a shard to sled (not flushed: the caller waits for the
    /// node's group commit).
    fn save_viewers(&self, quiz_id: &str, shard: u32, viewers: &[(String, Viewer)]) {
        let Some(tree) = &self.saved else { return };
        let prefix = saved_shard_prefix(quiz_id, shard);
        let mut batch = sled::Batch::default();
        for (user, viewer) in viewers {
            match rmp_serde::to_vec_named(viewer) {
                Ok(bytes) => {
                    let mut key = prefix.clone();
                    key.extend_from_slice(user.as_bytes());
                    batch.insert(key, bytes);
                }
                Err(error) => tracing::error!(quiz = %quiz_id, %error, "cannot encode a viewer"),
            }
        }
        if let Err(error) = tree.apply_batch(batch) {
            tracing::error!(quiz = %quiz_id, shard, %error, "cannot save judged viewers");
        }
    }

    /// The viewers of a shard saved here (an entry that does not decode is skipped).
    fn saved_viewers(&self, quiz_id: &str, shard: u32) -> Vec<(String, Viewer)> {
        let Some(tree) = &self.saved else {
            return Vec::new();
        };
        let prefix = saved_shard_prefix(quiz_id, shard);
        tree.scan_prefix(&prefix)
            .filter_map(|entry| {
                let (key, value) = entry
                    .map_err(|error| tracing::warn!(quiz = %quiz_id, %error, "cannot read saved viewers"))
                    .ok()?;
                let user = String::from_utf8(key.get(prefix.len()..)?.to_vec()).ok()?;
                let viewer = rmp_serde::from_slice::<Viewer>(&value)
                    .map_err(|error| tracing::warn!(quiz = %quiz_id, %error, "skipping an undecodable saved viewer"))
                    .ok()?;
                Some((user, viewer))
            })
            .collect()
    }

    fn state_seen(&self, quiz_id: &str, state: Arc<QuizState>) {
        let mut states = locked(&self.states);
        if states.len() >= SHOWS_CACHED_MAX && !states.contains_key(quiz_id) {
            states.clear();
        }
        let held = states.entry(quiz_id.to_string()).or_insert(state.clone());
        if state.revision > held.revision {
            *held = state;
        }
    }

    /// The shard, created empty if this node holds none of it (`None` past
    /// [`SHARDS_HELD_MAX`]); `true` if it was created.
    fn shard(&self, quiz_id: &str, shard: u32) -> Option<(HeldShard, bool)> {
        let mut shards = locked(&self.shards);
        let key = (quiz_id.to_string(), shard);
        if let Some(held) = shards.get(&key) {
            return Some((held.clone(), false));
        }
        if shards.len() >= SHARDS_HELD_MAX {
            return None;
        }
        let created = Arc::new(Mutex::new(AnswerShard::default()));
        shards.insert(key, created.clone());
        Some((created, true))
    }

    fn held_shard(&self, quiz_id: &str, shard: u32) -> Option<HeldShard> {
        locked(&self.shards)
            .get(&(quiz_id.to_string(), shard))
            .cloned()
    }
}

impl Quiz {
    /// A show's definition and the newest state this node knows (its cache, or the
    /// metadata if that is newer or `refresh`).
    pub(crate) fn quiz_show(
        &self,
        quiz_id: &str,
        refresh: bool,
    ) -> Option<(Arc<QuizRecord>, Arc<QuizState>)> {
        let cached_record = locked(&self.quiz.records).get(quiz_id).cloned();
        let cached_state = locked(&self.quiz.states).get(quiz_id).cloned();
        if let (false, Some(record), Some(state)) = (refresh, &cached_record, &cached_state) {
            return Some((record.clone(), state.clone()));
        }
        let metadata = self.ctx.cluster.metadata();
        let record = match cached_record {
            Some(record) => record,
            None => {
                let record: QuizRecord = metadata
                    .definitions
                    .get(&quiz_key(quiz_id))
                    .and_then(|bytes| rmp_serde::from_slice(bytes).ok())?;
                let record = Arc::new(record);
                let mut records = locked(&self.quiz.records);
                if records.len() >= SHOWS_CACHED_MAX {
                    records.clear();
                }
                records.insert(quiz_id.to_string(), record.clone());
                record
            }
        };
        let stored: QuizState = metadata
            .definitions
            .get(&state_key(quiz_id))
            .and_then(|bytes| rmp_serde::from_slice(bytes).ok())
            .unwrap_or_default();
        self.quiz.state_seen(quiz_id, Arc::new(stored));
        let state = locked(&self.quiz.states).get(quiz_id).cloned()?;
        Some((record, state))
    }

    /// A new phase from a show's controller (`QuizPhase`).
    pub(crate) fn quiz_phase_seen(&self, quiz_id: &str, state: &[u8]) {
        match rmp_serde::from_slice::<QuizState>(state) {
            Ok(state) => self.quiz.state_seen(quiz_id, Arc::new(state)),
            Err(error) => tracing::warn!(quiz = %quiz_id, %error, "undecodable quiz phase"),
        }
    }

    /// A viewer's `quiz.answer`, on its node: checks it is in the show's room, sends it to
    /// its shard's owner (batched), and gives the session its sealed verdict as a
    /// `quiz.result` notice too (it is then in the resume buffer).
    pub(crate) async fn quiz_answer(
        &self,
        session: &Arc<Session>,
        request: QuizAnswerRequest,
    ) -> Result<QuizResultEvent, ErrorBody> {
        let (record, _) = self.quiz_show(&request.quiz_id, false).ok_or_else(|| {
            error(
                ErrorCode::QuizNotFound,
                format!("no quiz {:?}", request.quiz_id),
            )
        })?;
        let room_id = record.definition.room_id.clone();
        if !session.with_core(|core| core.in_room(&room_id)) {
            return Err(error(
                ErrorCode::NotInRoom,
                format!("join the quiz's room {room_id:?} first"),
            ));
        }
        let shard = shard_of(&session.user_id, record.shards);
        let owner = self.ctx.owner_of_key(&shard_key(&request.quiz_id, shard));
        let (reply, verdict) = oneshot::channel();
        let item = AnswerItem {
            quiz_id: request.quiz_id.clone(),
            shard,
            user: session.user_id.clone(),
            question: request.question,
            option: request.option,
        };
        self.quiz_batcher(owner)
            .try_send(Pending { item, reply })
            .map_err(|_| {
                error(
                    ErrorCode::Unavailable,
                    "too many answers on their way; retry",
                )
            })?;
        let sealed = verdict.await.map_err(|_| {
            error(
                ErrorCode::Unavailable,
                "the answer was lost on its way; retry",
            )
        })??;
        let result = QuizResultEvent {
            room_id,
            quiz_id: request.quiz_id,
            question: request.question,
            sealed,
        };
        match Event::QuizResult(result.clone()).encode_body() {
            Ok(body) => session.deliver(&Arc::new(body)),
            Err(error) => tracing::warn!(%error, "cannot encode a quiz result"),
        }
        metrics::counter!("chorus_quiz_answers_total").increment(1);
        Ok(result)
    }

    /// The queue of answers toward `owner` (its sender task started on first use).
    fn quiz_batcher(&self, owner: NodeId) -> mpsc::Sender<Pending> {
        let mut batchers = locked(&self.quiz.batchers);
        if let Some(tx) = batchers.get(&owner).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(ANSWER_QUEUE_MAX);
        tokio::spawn(send_answer_batches(self.this.clone(), owner, rx));
        batchers.insert(owner, tx.clone());
        tx
    }

    /// Judges `items` on `owner`: here, or in one inter-node message.
    async fn quiz_answers_at(&self, owner: NodeId, items: Vec<AnswerItem>) -> Verdicts {
        if owner == self.ctx.cluster.node_id() {
            return self.quiz_judge(items).await;
        }
        let count = items.len();
        let failed = |why: String| vec![Err(error(ErrorCode::Unavailable, why)); count];
        let message = quiz_request(&QuizMessage::Answers { answers: items });
        let call = self.ctx.cluster.call_app(owner, message);
        match tokio::time::timeout(Duration::from_millis(ANSWER_CALL_TIMEOUT_MS), call).await {
            Ok(Ok(reply)) => match decode::<Verdicts>(&reply) {
                Ok(verdicts) if verdicts.len() == count => verdicts,
                Ok(_) => failed(format!("node {owner} answered a different number")),
                Err(e) => failed(format!("node {owner}: {}", e.message)),
            },
            Ok(Err(e)) => failed(format!(
                "the shard's owner (node {owner}) is unreachable: {e}"
            )),
            Err(_) => failed(format!(
                "the shard's owner (node {owner}) did not answer in {ANSWER_CALL_TIMEOUT_MS} ms"
            )),
        }
    }

    /// Judges answers to shards this node owns (`QuizAnswers`), replicates the judged
    /// viewers, then answers with each sealed verdict or refusal, in order.
    pub(crate) async fn quiz_judge(&self, items: Vec<AnswerItem>) -> Verdicts {
        let now_ms = unix_now_ms();
        let ring = self.ctx.cluster.ring();
        let self_id = self.ctx.cluster.node_id();
        let mut judged: BTreeMap<(String, u32), BTreeMap<String, Viewer>> = BTreeMap::new();
        let mut verdicts = Vec::with_capacity(items.len());
        for item in items {
            let key = shard_key(&item.quiz_id, item.shard);
            let owner = ring.as_ref().and_then(|r| r.owner(&key)).unwrap_or(self_id);
            if owner != self_id {
                verdicts.push(Err(error(
                    ErrorCode::Unavailable,
                    format!("the shard moved to node {owner}; retry"),
                )));
                continue;
            }
            let verdict = self.quiz_judge_one(&item, now_ms, &mut judged).await;
            verdicts.push(verdict);
        }
        // The judged viewers on a second node before any verdict is answered (best
        // effort: with no replica answering, the verdicts still go out, counted).
        let replicated = judged.into_iter().map(|((quiz_id, shard), viewers)| async move {
            let viewers = viewers.into_iter().collect();
            if let Err(refusal) = self.quiz_replicate(&quiz_id, shard, viewers).await {
                tracing::warn!(quiz = %quiz_id, shard, error = %refusal.message, "quiz shard not replicated");
                metrics::counter!("chorus_quiz_replication_failures_total").increment(1);
            }
        });
        futures_util::future::join_all(replicated).await;
        verdicts
    }

    async fn quiz_judge_one(
        &self,
        item: &AnswerItem,
        now_ms: u64,
        judged_viewers: &mut BTreeMap<(String, u32), BTreeMap<String, Viewer>>,
    ) -> Result<String, ErrorBody> {
        let not_found = || {
            error(
                ErrorCode::QuizNotFound,
                format!("no quiz {:?}", item.quiz_id),
            )
        };
        let (record, mut state) = self.quiz_show(&item.quiz_id, false).ok_or_else(not_found)?;
        if item.shard >= record.shards {
            return Err(error(ErrorCode::InvalidArgument, "wrong shard"));
        }
        // The controller tells every node a new phase before viewers hear of it; a node
        // that missed the message reads the committed state.
        if needs_committed_state(&state, item.question) {
            (_, state) = self.quiz_show(&item.quiz_id, true).ok_or_else(not_found)?;
        }
        let shard = self.quiz_shard(&item.quiz_id, item.shard).await?;
        let judged = {
            let mut shard = locked(&shard);
            let judged = judge(
                &record.definition,
                record.shards,
                &state,
                item.shard,
                &mut shard,
                now_ms,
                &item.user,
                item.question,
                item.option,
            );
            if judged.is_ok() {
                if let Some(viewer) = shard.viewers.get(&item.user).cloned() {
                    judged_viewers
                        .entry((item.quiz_id.clone(), item.shard))
                        .or_default()
                        .insert(item.user.clone(), viewer);
                }
            }
            judged
        };
        let judged = judged.map_err(|refusal| match refusal {
            JudgeRefusal::WrongShard => error(ErrorCode::InvalidArgument, "wrong shard"),
            JudgeRefusal::Refused(verdict) => error(
                ErrorCode::QuizRefused,
                format!("{}: question {}", verdict.name(), item.question),
            ),
            JudgeRefusal::NoKey => error(ErrorCode::Internal, "the question has no key"),
        })?;
        let key: [u8; SEAL_KEY_BYTES] = from_hex(&judged.key)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| error(ErrorCode::Internal, "the question has no key"))?;
        seal_verdict(
            &key,
            &item.quiz_id,
            item.question,
            &item.user,
            judged.verdict.name(),
        )
        .map_err(|e| error(ErrorCode::Internal, e.to_string()))
    }

    /// The shard here; one this node did not hold is first filled from the copies of the
    /// other live nodes (its previous owner or replica).
    async fn quiz_shard(&self, quiz_id: &str, shard: u32) -> Result<HeldShard, ErrorBody> {
        let (held, created) = self.quiz.shard(quiz_id, shard).ok_or_else(|| {
            error(
                ErrorCode::Unavailable,
                "this node holds too many answer shards",
            )
        })?;
        if created {
            let message = quiz_request(&QuizMessage::Shards(ShardOp::Copy {
                quiz_id: quiz_id.to_string(),
                shard,
            }));
            let copies = self.ctx.live_peers().into_iter().map(|peer| {
                let call = self.ctx.cluster.call_app(peer, message.clone());
                async move {
                    let timeout = Duration::from_millis(QUIZ_REPLICATE_TIMEOUT_MS);
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(reply)) => match decode::<Result<ShardReply, ErrorBody>>(&reply) {
                            Ok(Ok(ShardReply::Viewers(viewers))) => viewers,
                            _ => Vec::new(),
                        },
                        _ => Vec::new(),
                    }
                }
            });
            let copies = futures_util::future::join_all(copies).await;
            let saved = self.quiz.saved_viewers(quiz_id, shard);
            let mut shard = locked(&held);
            for (user, viewer) in copies.into_iter().flatten().chain(saved) {
                shard.merge(&user, viewer);
            }
        }
        Ok(held)
    }

    /// Sends judged viewers to the shard's replica: the ring's next node for its key, or
    /// the one after it.
    async fn quiz_replicate(
        &self,
        quiz_id: &str,
        shard: u32,
        viewers: Vec<(String, Viewer)>,
    ) -> Result<(), ErrorBody> {
        let self_id = self.ctx.cluster.node_id();
        let candidates: Vec<NodeId> = self
            .ctx
            .cluster
            .ring()
            .map(|ring| ring.owners_n(&shard_key(quiz_id, shard), 3))
            .unwrap_or_default()
            .into_iter()
            .filter(|id| *id != self_id)
            .collect();
        if candidates.is_empty() {
            // No other node: the verdicts go out once the viewers are on this node's disk.
            self.quiz.save_viewers(quiz_id, shard, &viewers);
            return self
                .ctx
                .group_commit
                .durable()
                .await
                .map_err(|e| error(ErrorCode::Unavailable, format!("own copy: {e}")));
        }
        let message = quiz_request(&QuizMessage::Shards(ShardOp::Replicate {
            quiz_id: quiz_id.to_string(),
            shard,
            viewers,
        }));
        let mut failures = Vec::new();
        for replica in candidates {
            let call = self.ctx.cluster.call_app(replica, message.clone());
            let timeout = Duration::from_millis(QUIZ_REPLICATE_TIMEOUT_MS);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(reply)) => match decode::<Result<ShardReply, ErrorBody>>(&reply) {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) | Err(e) => failures.push(format!("node {replica}: {}", e.message)),
                },
                Ok(Err(e)) => failures.push(format!("node {replica}: {e}")),
                Err(_) => failures.push(format!("node {replica}: no answer")),
            }
        }
        Err(error(ErrorCode::Unavailable, failures.join("; ")))
    }

    /// Runs `op` on this node's shards (`QuizShards`).
    pub(crate) async fn quiz_shard_op(&self, op: ShardOp) -> Result<ShardReply, ErrorBody> {
        match op {
            ShardOp::Close {
                quiz_id,
                question,
                options,
                shards,
            } => {
                let mut total = vec![0u64; usize::from(options)];
                for shard in shards {
                    let held = self.quiz_shard(&quiz_id, shard).await?;
                    let counts = locked(&held).close(question, options);
                    for (sum, count) in total.iter_mut().zip(counts) {
                        *sum = sum.saturating_add(count);
                    }
                }
                Ok(ShardReply::Counts(total))
            }
            ShardOp::Survivors {
                quiz_id,
                questions,
                shards,
            } => {
                let mut survivors = Vec::new();
                for shard in shards {
                    let held = self.quiz_shard(&quiz_id, shard).await?;
                    survivors.extend(locked(&held).survivors(questions));
                }
                Ok(ShardReply::Survivors(survivors))
            }
            ShardOp::History {
                quiz_id,
                shard,
                user,
            } => {
                let held = self.quiz_shard(&quiz_id, shard).await?;
                let viewer = locked(&held).viewers.get(&user).cloned();
                Ok(ShardReply::History(viewer))
            }
            ShardOp::Replicate {
                quiz_id,
                shard,
                viewers,
            } => {
                let (held, _) = self.quiz.shard(&quiz_id, shard).ok_or_else(|| {
                    error(
                        ErrorCode::Unavailable,
                        "this node holds too many answer shards",
                    )
                })?;
                let mut held = locked(&held);
                for (user, viewer) in viewers {
                    held.merge(&user, viewer);
                }
                Ok(ShardReply::Done)
            }
            ShardOp::Copy { quiz_id, shard } => Ok(ShardReply::Viewers(
                self.quiz
                    .held_shard(&quiz_id, shard)
                    .map(|held| {
                        locked(&held)
                            .viewers
                            .iter()
                            .map(|(user, viewer)| (user.clone(), viewer.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            )),
        }
    }

    /// Runs `op` on the node that owns `shard`'s key.
    async fn quiz_shard_op_at(&self, owner: NodeId, op: ShardOp) -> Result<ShardReply, ErrorBody> {
        if owner == self.ctx.cluster.node_id() {
            return self.quiz_shard_op(op).await;
        }
        let call = self
            .ctx
            .cluster
            .call_app(owner, quiz_request(&QuizMessage::Shards(op)));
        match tokio::time::timeout(Duration::from_millis(QUIZ_PEER_TIMEOUT_MS), call).await {
            Ok(Ok(reply)) => decode::<Result<ShardReply, ErrorBody>>(&reply).and_then(|r| r),
            Ok(Err(e)) => Err(error(
                ErrorCode::Unavailable,
                format!("node {owner} is unreachable: {e}"),
            )),
            Err(_) => Err(error(
                ErrorCode::Unavailable,
                format!("node {owner} did not answer in {QUIZ_PEER_TIMEOUT_MS} ms"),
            )),
        }
    }

    /// The show's shards grouped by owner.
    fn shards_by_owner(&self, quiz_id: &str, shards: u32) -> BTreeMap<NodeId, Vec<u32>> {
        let mut owners: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for shard in 0..shards {
            owners
                .entry(self.ctx.owner_of_key(&shard_key(quiz_id, shard)))
                .or_default()
                .push(shard);
        }
        owners
    }

    /// Runs an operator action on the show's controller (here, or on the owner of its key).
    pub(crate) async fn quiz_action(
        &self,
        quiz_id: &str,
        action: QuizAction,
    ) -> Result<serde_json::Value, ErrorBody> {
        let owner = self.ctx.owner_of_key(&quiz_key(quiz_id));
        let json = if owner == self.ctx.cluster.node_id() {
            self.quiz_control(quiz_id, action).await?
        } else {
            let message = quiz_request(&QuizMessage::Control {
                quiz_id: quiz_id.to_string(),
                action,
            });
            let call = self.ctx.cluster.call_app(owner, message);
            // The controller itself waits for Raft and for every node.
            let timeout = Duration::from_millis(3 * QUIZ_PEER_TIMEOUT_MS);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(reply)) => decode::<Result<String, ErrorBody>>(&reply).and_then(|r| r)?,
                Ok(Err(e)) => {
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!("the quiz's controller (node {owner}) is unreachable: {e}"),
                    ))
                }
                Err(_) => {
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!("the quiz's controller (node {owner}) did not answer in time"),
                    ))
                }
            }
        };
        serde_json::from_str(&json).map_err(|e| error(ErrorCode::Internal, e.to_string()))
    }

    /// Runs an operator action here, as the show's controller; answers JSON text. The
    /// decisions are `QuizControl`'s; this gathers from the shards, commits, announces.
    pub(crate) async fn quiz_control(
        &self,
        quiz_id: &str,
        action: QuizAction,
    ) -> Result<String, ErrorBody> {
        let _serialized = self.quiz.control.lock(quiz_id).await;
        let (record, state) = self
            .quiz_show(quiz_id, true)
            .ok_or_else(|| error(ErrorCode::QuizNotFound, format!("no quiz {quiz_id:?}")))?;
        let now_ms = unix_now_ms();
        let mut control = QuizControl::new(record.definition.clone(), (*state).clone());
        let mut step = match &action {
            QuizAction::Push => {
                let mut key = [0u8; SEAL_KEY_BYTES];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                    .map_err(|_| error(ErrorCode::Internal, "no randomness for the key"))?;
                control.push(now_ms, to_hex(&key)).map_err(phase_error)?
            }
            QuizAction::Announce => control.announce(now_ms).map_err(phase_error)?,
            QuizAction::Finish => control.finish().map_err(phase_error)?,
            QuizAction::Status => return Ok(status_json(&record, &state).to_string()),
            QuizAction::Results { user } => {
                let history = match user {
                    None => None,
                    Some(user) => Some((
                        user.clone(),
                        self.quiz_history(quiz_id, &record, user).await?,
                    )),
                };
                return Ok(results_json(&record, &state, history).to_string());
            }
        };
        loop {
            step = match step {
                ControlStep::Gather(gather) => {
                    let gathered = self.quiz_gather(quiz_id, record.shards, &gather).await?;
                    match gathered {
                        Gathered::Counts(parts) => control.counts(&parts),
                        Gathered::Survivors(winners) => control.survivors(&winners),
                    }
                    .map_err(phase_error)?
                }
                ControlStep::Commit { state, notice } => {
                    self.quiz_commit(quiz_id, state).await?;
                    let definition = &record.definition;
                    let reply = notice_json(quiz_id, &notice);
                    let event = notice_event(&definition.room_id, quiz_id, notice);
                    self.quiz_broadcast(&definition.room_id, event).await?;
                    break match action {
                        QuizAction::Finish => None,
                        _ => Some(reply),
                    };
                }
                ControlStep::Done => break None,
            };
        }
        .map_or_else(
            || {
                let (_, state) = self
                    .quiz_show(quiz_id, false)
                    .ok_or_else(|| error(ErrorCode::QuizNotFound, "the quiz vanished"))?;
                Ok(results_json(&record, &state, None).to_string())
            },
            |reply| Ok(reply.to_string()),
        )
    }

    /// Gathers from every shard of a show what the controller asks for.
    async fn quiz_gather(
        &self,
        quiz_id: &str,
        shards: u32,
        gather: &Gather,
    ) -> Result<Gathered, ErrorBody> {
        let unexpected = |other: ShardReply| {
            error(
                ErrorCode::Internal,
                format!("unexpected shard reply {other:?}"),
            )
        };
        let mut parts = Vec::new();
        let mut winners = Vec::new();
        for (owner, shards) in self.shards_by_owner(quiz_id, shards) {
            let quiz_id = quiz_id.to_string();
            let op = match *gather {
                Gather::Close { question, options } => ShardOp::Close {
                    quiz_id,
                    question,
                    options,
                    shards,
                },
                Gather::Survivors { questions } => ShardOp::Survivors {
                    quiz_id,
                    questions,
                    shards,
                },
            };
            match self.quiz_shard_op_at(owner, op).await? {
                ShardReply::Counts(part) => parts.push(part),
                ShardReply::Survivors(part) => winners.extend(part),
                other => return Err(unexpected(other)),
            }
        }
        Ok(match gather {
            Gather::Close { .. } => Gathered::Counts(parts),
            Gather::Survivors { .. } => Gathered::Survivors(winners),
        })
    }

    /// One viewer's history, from its shard's owner.
    async fn quiz_history(
        &self,
        quiz_id: &str,
        record: &QuizRecord,
        user: &str,
    ) -> Result<Option<Viewer>, ErrorBody> {
        let shard = shard_of(user, record.shards);
        let owner = self.ctx.owner_of_key(&shard_key(quiz_id, shard));
        let op = ShardOp::History {
            quiz_id: quiz_id.to_string(),
            shard,
            user: user.to_string(),
        };
        Ok(match self.quiz_shard_op_at(owner, op).await? {
            ShardReply::History(viewer) => viewer,
            _ => None,
        })
    }

    /// Commits a show's new state in Raft, then tells every live node (each waits at most
    /// [`QUIZ_PEER_TIMEOUT_MS`]; one that misses it reads the metadata when an answer
    /// names a question it does not know).
    async fn quiz_commit(&self, quiz_id: &str, state: QuizState) -> Result<(), ErrorBody> {
        let value = rmp_serde::to_vec_named(&state)
            .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
        let command = MetadataCommand::PutDefinition {
            key: state_key(quiz_id),
            value: value.clone(),
        };
        match self.ctx.cluster.write(command).await {
            Ok(MetadataResponse::Ok) => {}
            Ok(other) => {
                return Err(error(
                    ErrorCode::Unavailable,
                    format!("not committed: {other:?}"),
                ))
            }
            Err(e) => return Err(error(ErrorCode::Unavailable, format!("not committed: {e}"))),
        }
        self.quiz.state_seen(quiz_id, Arc::new(state));
        let message = quiz_request(&QuizMessage::Phase {
            quiz_id: quiz_id.to_string(),
            state: Bytes::from(value),
        });
        let told = self.ctx.live_peers().into_iter().map(|peer| {
            let call = self.ctx.cluster.call_app(peer, message.clone());
            async move {
                let timeout = Duration::from_millis(QUIZ_PEER_TIMEOUT_MS);
                if !matches!(tokio::time::timeout(timeout, call).await, Ok(Ok(_))) {
                    tracing::warn!(quiz = %quiz_id, peer, "a node did not take the quiz's phase");
                }
            }
        });
        futures_util::future::join_all(told).await;
        Ok(())
    }

    /// One notice to every member of the room (through its owner).
    async fn quiz_broadcast(&self, room_id: &str, event: Event) -> Result<(), ErrorBody> {
        let body = event
            .encode_body()
            .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
        self.rooms.announce(room_id, Arc::new(body)).await
    }
}

/// What the shards gave the controller.
enum Gathered {
    Counts(Vec<Vec<u64>>),
    Survivors(Vec<String>),
}

/// The operator's answer to a committed step.
fn notice_json(quiz_id: &str, notice: &Notice) -> serde_json::Value {
    match notice {
        Notice::Question {
            index, deadline_ms, ..
        } => serde_json::json!({
            "quiz_id": quiz_id,
            "question": index,
            "deadline_ms": deadline_ms,
        }),
        Notice::Announce {
            question,
            correct,
            counts,
            last,
            ..
        } => serde_json::json!({
            "quiz_id": quiz_id,
            "question": question,
            "correct": correct,
            "counts": counts,
            "last": last,
        }),
        Notice::Finished { winners, .. } => serde_json::json!({
            "quiz_id": quiz_id,
            "winners": winners,
        }),
    }
}

/// The room's notification for a committed step.
fn notice_event(room_id: &str, quiz_id: &str, notice: Notice) -> Event {
    let room_id = room_id.to_string();
    let quiz_id = quiz_id.to_string();
    match notice {
        Notice::Question {
            index,
            questions,
            text,
            options,
            deadline_ms,
        } => Event::QuizQuestion(QuizQuestionEvent {
            room_id,
            quiz_id,
            index,
            questions,
            text,
            options,
            deadline_ms,
        }),
        Notice::Announce {
            question,
            correct,
            key,
            counts,
            last,
        } => Event::QuizAnnounce(QuizAnnounceEvent {
            room_id,
            quiz_id,
            question,
            correct,
            key,
            counts,
            last,
        }),
        Notice::Finished {
            winners,
            prize_cents,
            share_cents,
        } => Event::QuizFinished(QuizFinishedEvent {
            room_id,
            quiz_id,
            winners,
            prize_cents,
            share_cents,
        }),
    }
}

fn status_json(record: &QuizRecord, state: &QuizState) -> serde_json::Value {
    let definition = &record.definition;
    serde_json::json!({
        "quiz_id": definition.quiz_id,
        "room_id": definition.room_id,
        "start_ms": definition.start_ms,
        "prize_cents": definition.prize_cents,
        "window_ms": definition.window_ms,
        "questions": definition.questions.len(),
        "shards": record.shards,
        "revision": state.revision,
        "phase": state.phase,
        "counts": state.counts,
        "finished": state.results.is_some(),
    })
}

fn results_json(
    record: &QuizRecord,
    state: &QuizState,
    history: Option<(String, Option<Viewer>)>,
) -> serde_json::Value {
    let mut value = status_json(record, state);
    let results = state.results.clone().unwrap_or_default();
    value["winners"] = serde_json::json!(results.len());
    value["paid_cents"] = serde_json::json!(results.values().sum::<u64>());
    value["amounts"] = serde_json::json!(results);
    if let Some((user, viewer)) = history {
        let verdicts: BTreeMap<String, serde_json::Value> = viewer
            .as_ref()
            .map(|v| {
                v.verdicts
                    .iter()
                    .map(|(k, (option, verdict))| {
                        (
                            k.to_string(),
                            serde_json::json!({"option": option, "verdict": verdict.name()}),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        value["user"] = serde_json::json!({
            "user": user,
            "known": viewer.is_some(),
            "passed": viewer.as_ref().map_or(0, |v| v.progress),
            "eliminated_at": viewer.as_ref().and_then(|v| v.eliminated_at),
            "revived_at": viewer.as_ref().and_then(|v| v.revived_at),
            "revive_cards": viewer.as_ref().map_or(0, |v| v.revive_cards),
            "verdicts": verdicts,
            "cents": results.get(&user).copied().unwrap_or(0),
        });
    }
    value
}

/// Sends the answers queued toward `owner` in batches, each batch's verdicts back to
/// their askers. Runs while the node lives.
async fn send_answer_batches(node: Weak<Quiz>, owner: NodeId, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(ANSWER_BATCHES_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Everything queued meanwhile goes in the same message.
        let mut batch = vec![first];
        while batch.len() < ANSWER_BATCH_MAX {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            let (items, replies): (Vec<AnswerItem>, Vec<_>) =
                batch.into_iter().map(|p| (p.item, p.reply)).unzip();
            metrics::histogram!("chorus_quiz_answer_batch_items").record(items.len() as f64);
            let verdicts = node.quiz_answers_at(owner, items).await;
            for (reply, verdict) in replies.into_iter().zip(verdicts) {
                let _ = reply.send(verdict);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_viewers_come_back_per_shard_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alice = Viewer {
            progress: 2,
            ..Viewer::default()
        };
        {
            let db = sled::open(dir.path()).expect("open");
            let quiz = QuizService::open(&db).expect("service");
            quiz.save_viewers("q-1", 3, &[("alice".into(), alice.clone())]);
            quiz.save_viewers("q-1", 4, &[("bob".into(), Viewer::default())]);
            quiz.save_viewers("q-10", 3, &[("carol".into(), Viewer::default())]);
            db.flush().expect("flush");
        }
        let db = sled::open(dir.path()).expect("reopen");
        let quiz = QuizService::open(&db).expect("service");
        assert_eq!(
            quiz.saved_viewers("q-1", 3),
            vec![("alice".to_string(), alice)]
        );
        assert!(quiz.saved_viewers("q-2", 3).is_empty());
    }
}
