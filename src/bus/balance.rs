//! Who leads the service's streams now, and moving them to the placement plan
//! (`placement.rs`): leader step-downs for replicated streams (and their durable consumers),
//! placement-tag updates for single-replica streams.

use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream;
use async_nats::jetstream::Context;
use serde::{Deserialize, Serialize};

use super::placement;
use super::{BusError, Topology};

/// One stream's leadership as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLead {
    pub name: String,
    pub replicas: usize,
    /// The server leading it (for a single replica: the server holding it); `None` while it
    /// has no leader.
    pub leader: Option<String>,
    /// Every member's server, the leader included, and whether it can lead now.
    pub peers: Vec<Peer>,
    /// The placement tags of its config.
    pub tags: Vec<String>,
    /// Messages it has ever stored (its last sequence): the traffic it has carried.
    pub messages: u64,
    /// The routers' durable consumer, on an input partition stream.
    pub consumer: Option<ConsumerLead>,
}

/// A durable consumer's own Raft group: its leader and members, as for a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerLead {
    pub name: String,
    pub leader: Option<String>,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Online and caught up, so a step-down to it would succeed.
    pub ready: bool,
}

/// What the plan asks to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub stream: String,
    /// A durable consumer of the stream, when it is the consumer's leader that moves.
    pub consumer: Option<String>,
    pub from: Option<String>,
    /// The server (a leader move) or the node tag (a single-replica placement).
    pub to: String,
}

/// Reads every stream of the plan that exists (streams of the plan not created yet are left
/// out), with the leader of the routers' consumer on each input partition.
pub async fn survey(js: &Context, topology: &Topology) -> Result<Vec<StreamLead>, BusError> {
    let s = &topology.streams;
    let partitions: Vec<String> = (0..topology.input_partitions())
        .map(|p| topology.partition_stream(p))
        .collect();
    let mut leads = Vec::new();
    for name in placement::with_buckets(topology) {
        let Some(mut stream) = super::lookup_stream(js, &name).await? else {
            continue;
        };
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::transient(format!("reading stream {name}"), e))?
            .clone();
        // The routers' consumer of each input partition follows its stream's leader. A
        // shard log's consumer does not: its holder creates it again at each tenure (and
        // after a stall), so its leader falls where the broker elects it, and moving it
        // would only interrupt the worker's pulls.
        let durable = partitions
            .contains(&name)
            .then(|| s.router_consumer.clone());
        let consumer = match durable {
            Some(durable) => match stream.consumer_info(&durable).await {
                Ok(consumer) => {
                    let (leader, peers) = members(consumer.cluster.as_ref());
                    Some(ConsumerLead {
                        name: durable,
                        leader,
                        peers,
                    })
                }
                // Not created yet (a shard nobody took): nothing to move.
                Err(_) => None,
            },
            None => None,
        };
        leads.push(lead_of(&info, consumer));
    }
    Ok(leads)
}

/// A Raft group's leader and every member (the leader included), sorted by name.
fn members(cluster: Option<&stream::ClusterInfo>) -> (Option<String>, Vec<Peer>) {
    let leader = cluster.and_then(|c| c.leader.clone());
    let mut peers: Vec<Peer> = leader
        .iter()
        .map(|name| Peer {
            name: name.clone(),
            ready: true,
        })
        .collect();
    for replica in cluster.map(|c| c.replicas.as_slice()).unwrap_or_default() {
        peers.push(Peer {
            name: replica.name.clone(),
            ready: replica.current && !replica.offline,
        });
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    (leader, peers)
}

fn lead_of(info: &stream::Info, consumer: Option<ConsumerLead>) -> StreamLead {
    let (leader, peers) = members(info.cluster.as_ref());
    StreamLead {
        name: info.config.name.clone(),
        replicas: info.config.num_replicas,
        leader,
        peers,
        tags: info
            .config
            .placement
            .as_ref()
            .map(|p| p.tags.clone())
            .unwrap_or_default(),
        messages: info.state.last_sequence,
        consumer,
    }
}

/// The leader each replicated stream should have, in the survey's order (the plan's).
pub fn planned_leaders(survey: &[StreamLead]) -> Vec<(String, Option<String>)> {
    let replicated: Vec<(&str, Vec<String>)> = survey
        .iter()
        .filter(|lead| lead.replicas > 1)
        .map(|lead| {
            let peers = lead.peers.iter().map(|p| p.name.clone()).collect();
            (lead.name.as_str(), peers)
        })
        .collect();
    let planned = placement::plan(&replicated);
    replicated
        .into_iter()
        .zip(planned)
        .map(|((name, _), leader)| (name.to_string(), leader))
        .collect()
}

/// Replicated streams whose leader (or whose durable consumer's leader) is not the planned
/// one, where the planned server is online and caught up in that Raft group (a step-down to
/// a lagging member lands anywhere); stream moves before consumer moves, and a consumer
/// follows only a stream already led where the plan says.
pub fn leader_moves(survey: &[StreamLead]) -> Vec<Move> {
    let mut streams = Vec::new();
    let mut consumers = Vec::new();
    for (lead, (_, planned)) in survey
        .iter()
        .filter(|lead| lead.replicas > 1)
        .zip(planned_leaders(survey))
    {
        let Some(planned) = planned else { continue };
        let ready = |peers: &[Peer]| peers.iter().any(|p| p.name == planned && p.ready);
        if lead.leader.as_ref() != Some(&planned) {
            if ready(&lead.peers) {
                streams.push(Move {
                    stream: lead.name.clone(),
                    consumer: None,
                    from: lead.leader.clone(),
                    to: planned.clone(),
                });
            }
            continue;
        }
        if let Some(consumer) = &lead.consumer {
            if consumer.leader.as_ref() != Some(&planned) && ready(&consumer.peers) {
                consumers.push(Move {
                    stream: lead.name.clone(),
                    consumer: Some(consumer.name.clone()),
                    from: consumer.leader.clone(),
                    to: planned,
                });
            }
        }
    }
    streams.extend(consumers);
    streams
}

/// Single-replica streams whose placement tag is not the plan's (`streams.node_tags`).
pub fn placement_moves(topology: &Topology, survey: &[StreamLead]) -> Vec<Move> {
    survey
        .iter()
        .filter(|lead| lead.replicas == 1)
        .filter_map(|lead| {
            let wanted = topology.placement_of(&lead.name)?.tags;
            (lead.tags != wanted).then(|| Move {
                stream: lead.name.clone(),
                consumer: None,
                from: lead.leader.clone(),
                to: wanted.join(","),
            })
        })
        .collect()
}

#[derive(Serialize)]
struct StepDownRequest<'a> {
    placement: Preferred<'a>,
}

#[derive(Serialize)]
struct Preferred<'a> {
    preferred: &'a str,
}

#[derive(Deserialize)]
struct StepDownResponse {
    #[serde(default)]
    success: bool,
}

/// Carries out one move: a leader step-down to `to` (nats-server 2.11+), or for a
/// single-replica stream a placement update that makes the broker move it to the tagged node.
/// A step-down to the server that already leads is no error (another instance did it first).
pub async fn carry_out(js: &Context, topology: &Topology, step: &Move) -> Result<(), BusError> {
    let stream = &step.stream;
    let context = format!("moving {stream} to {}", step.to);
    if topology.streams.replicas == 1 {
        let mut info = super::stream_info(js, stream).await?;
        info.config.placement = topology.placement_of(stream);
        return js
            .update_stream(&info.config)
            .await
            .map(drop)
            .map_err(|e| super::jetstream_error(context, e));
    }
    let subject = match &step.consumer {
        Some(consumer) => format!("CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"),
        None => format!("STREAM.LEADER.STEPDOWN.{stream}"),
    };
    let request = StepDownRequest {
        placement: Preferred {
            preferred: &step.to,
        },
    };
    let response: Response<StepDownResponse> = js
        .request(subject, &request)
        .await
        .map_err(|e| BusError::transient(context.clone(), e))?;
    match response {
        Response::Ok(StepDownResponse { success: true }) => Ok(()),
        Response::Ok(_) => Err(BusError::transient(context, "the server said no success")),
        Response::Err { error } if error.to_string().contains("already leader") => Ok(()),
        Response::Err { error } => Err(BusError::transient(context, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead(name: &str, leader: &str, peers: &[(&str, bool)]) -> StreamLead {
        let peers: Vec<Peer> = peers
            .iter()
            .map(|(name, ready)| Peer {
                name: (*name).into(),
                ready: *ready,
            })
            .collect();
        StreamLead {
            name: name.into(),
            replicas: 3,
            leader: Some(leader.into()),
            peers: peers.clone(),
            tags: Vec::new(),
            messages: 0,
            consumer: Some(ConsumerLead {
                name: "router".into(),
                leader: Some(leader.into()),
                peers,
            }),
        }
    }

    #[test]
    fn leaders_move_to_the_plan_streams_first_and_never_to_a_node_that_is_down() {
        let all = [("n0", true), ("n1", true), ("n2", true)];
        let n2_down = [("n0", true), ("n1", true), ("n2", false)];
        let mut p2 = lead("P2", "n0", &n2_down);
        p2.consumer = None;
        let mut p1 = lead("P1", "n1", &all);
        if let Some(consumer) = p1.consumer.as_mut() {
            consumer.leader = Some("n0".into());
        }
        let survey = vec![lead("P0", "n0", &all), p1, p2, lead("P3", "n2", &all)];
        let moves = leader_moves(&survey);
        let described: Vec<_> = moves
            .iter()
            .map(|m| (m.stream.as_str(), m.consumer.is_some(), m.to.as_str()))
            .collect();
        // P2's planned leader is n2, which is down: it stays where it is for now. P3's is
        // n0 (the fewest so far): its stream moves first, its consumer in a later round.
        assert_eq!(
            described,
            [("P3", false, "n0"), ("P1", true, "n1")],
            "{moves:?}"
        );
    }
}
