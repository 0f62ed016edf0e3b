//! Client side of the live quiz: keeps a viewer's sealed verdicts until the announcement
//! brings each question's key, then opens them (`chorus_protocol::sealed`).

use std::collections::BTreeMap;

use chorus_protocol::{Event, QuizResultEvent};

/// Sealed verdicts kept per show, at most this many (older ones are dropped first).
pub const SEALED_KEPT_MAX: usize = 1_024;

/// A verdict opened with the announced key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpenedVerdict {
    /// The show.
    pub quiz_id: String,
    /// The question.
    pub question: u32,
    /// `correct`, `revived`, `wrong` or `late`; or why it did not open.
    pub verdict: Result<String, String>,
}

/// A viewer's sealed verdicts, waiting for their keys.
#[derive(Debug, Default)]
pub struct SealedResults {
    sealed: BTreeMap<(String, u32), String>,
}

impl SealedResults {
    /// Keeps a sealed verdict (from the `quiz.answer` response or a `quiz.result`).
    pub fn keep(&mut self, result: &QuizResultEvent) {
        if self.sealed.len() >= SEALED_KEPT_MAX {
            self.sealed.pop_first();
        }
        self.sealed.insert(
            (result.quiz_id.clone(), result.question),
            result.sealed.clone(),
        );
    }

    /// Looks at a notification for `user`: keeps `quiz.result`s; for a `quiz.announce`,
    /// opens the verdict held for that question, if any.
    pub fn observe(&mut self, user: &str, event: &Event) -> Option<OpenedVerdict> {
        match event {
            Event::QuizResult(result) => {
                self.keep(result);
                None
            }
            Event::QuizAnnounce(announce) => {
                let sealed = self
                    .sealed
                    .remove(&(announce.quiz_id.clone(), announce.question))?;
                let verdict = chorus_protocol::sealed::open_verdict(
                    &announce.key,
                    &announce.quiz_id,
                    announce.question,
                    user,
                    &sealed,
                )
                .map_err(|e| e.to_string());
                Some(OpenedVerdict {
                    quiz_id: announce.quiz_id.clone(),
                    question: announce.question,
                    verdict,
                })
            }
            _ => None,
        }
    }
}

impl OpenedVerdict {
    /// As `chorus client` prints it: `{"kind":"quiz.verdict","body":{…}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let (verdict, error) = match &self.verdict {
            Ok(verdict) => (Some(verdict.as_str()), None),
            Err(error) => (None, Some(error.as_str())),
        };
        serde_json::json!({
            "kind": "quiz.verdict",
            "body": {
                "quiz_id": self.quiz_id,
                "question": self.question,
                "verdict": verdict,
                "error": error,
            }
        })
    }
}
