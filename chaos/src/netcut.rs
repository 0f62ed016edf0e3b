//! Link cuts between nodes with nftables: every node listens on its own loopback address,
//! so dropping the packets between one node's address and the others' cuts exactly its
//! inter-node links (Raft, relays, replication) and nothing else: clients connect from
//! 127.0.0.1 and keep their connections.
//!
//! Needs `nft` and the right to change the ruleset (root, or CAP_NET_ADMIN).

use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::ChaosError;

/// An active cut: its nftables table, removed by [`LinkCut::heal`] (or, as a last resort,
/// on drop).
#[derive(Debug)]
pub struct LinkCut {
    table: String,
    healed: bool,
}

/// The table name for this process (runs in parallel use distinct names).
fn table_name() -> String {
    format!("chorus_chaos_{}", std::process::id())
}

fn set(addresses: &[IpAddr]) -> String {
    let list: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    format!("{{ {} }}", list.join(", "))
}

async fn nft(args: &[&str], script: Option<&str>) -> Result<(), ChaosError> {
    let mut command = tokio::process::Command::new("nft");
    command
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| ChaosError::Fault(format!("cannot run nft (install nftables): {e}")))?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| ChaosError::Fault(format!("nft stdin: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| ChaosError::Fault(format!("nft: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ChaosError::Fault(format!(
            "nft {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl LinkCut {
    /// Whether link cuts can be made here (`nft` runs and may change the ruleset).
    pub async fn available() -> bool {
        let probe = format!("{}_probe", table_name());
        nft(&["add", "table", "inet", &probe], None).await.is_ok()
            && nft(&["delete", "table", "inet", &probe], None)
                .await
                .is_ok()
    }

    /// Cuts every link between `node` and `others`, both ways.
    pub async fn isolate(node: IpAddr, others: &[IpAddr]) -> Result<LinkCut, ChaosError> {
        let table = table_name();
        let others = set(others);
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip saddr {node} ip daddr {others} drop\n    ip saddr {others} ip daddr {node} drop\n  }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&script)).await?;
        Ok(LinkCut {
            table,
            healed: false,
        })
    }

    /// Cuts the links between `a` and `b` only, both ways (each still reaches the others).
    pub async fn between(a: IpAddr, b: IpAddr) -> Result<LinkCut, ChaosError> {
        Self::with_rules(&format!(
            "    ip saddr {a} ip daddr {b} drop\n    ip saddr {b} ip daddr {a} drop\n"
        ))
        .await
    }

    /// Drops what `node` sends to `others`; what they send to it still arrives (an
    /// asymmetric cut).
    pub async fn one_way(node: IpAddr, others: &[IpAddr]) -> Result<LinkCut, ChaosError> {
        Self::with_rules(&format!(
            "    ip saddr {node} ip daddr {} drop\n",
            set(others)
        ))
        .await
    }

    async fn with_rules(rules: &str) -> Result<LinkCut, ChaosError> {
        let table = table_name();
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&script)).await?;
        Ok(LinkCut {
            table,
            healed: false,
        })
    }

    /// Restores the links.
    pub async fn heal(mut self) -> Result<(), ChaosError> {
        self.healed = true;
        nft(&["delete", "table", "inet", &self.table], None).await
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        if !self.healed {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", &self.table])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
