"""A gRPC client of the betting line provider (betting.v1.LineProvider), stubs generated from
betting/grpc/betting.proto.

    python examples/grpc_client.py --target 127.0.0.1:50051 --token <staff API token>

Creates an event (staff token, sent as `authorization: Bearer <token>` metadata), reads it back,
lists the open events, then watches the change feed until it has seen the snapshot and one
change (the odds update this script makes). Plaintext on loopback; pass --ca <pem> for TLS.
Errors are gRPC statuses: INVALID_ARGUMENT names the field, UNAUTHENTICATED/PERMISSION_DENIED
the token, NOT_FOUND/FAILED_PRECONDITION the event.
"""

import argparse
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--token", required=True, help="a staff API token")
    parser.add_argument("--ca", help="PEM CA bundle: use TLS")
    args = parser.parse_args()
    if args.ca:
        channel = grpc.secure_channel(
            args.target, grpc.ssl_channel_credentials(Path(args.ca).read_bytes())
        )
    else:
        channel = grpc.insecure_channel(args.target)
    stub = pb_grpc.LineProviderStub(channel)
    auth = (("authorization", f"Bearer {args.token}"),)

    deadline = Timestamp()
    deadline.FromDatetime(datetime.now(UTC) + timedelta(hours=2))
    event_id = f"example-{uuid.uuid4().hex[:8]}"
    try:
        created = stub.CreateEvent(
            pb.CreateEventRequest(
                id=event_id, name="Example match", coefficient="1.75", deadline=deadline
            ),
            metadata=auth,
            timeout=10,
        )
        print(f"created {created.id} at {created.coefficient} (state {created.state})")
        print(f"get: {stub.GetEvent(pb.GetEventRequest(id=event_id), timeout=10).name}")
        listed = stub.ListEvents(pb.ListEventsRequest(open_only=True), timeout=10)
        print(f"open events: {len(listed.events)}")

        feed = stub.WatchEvents(pb.WatchEventsRequest(), timeout=30)
        for item in feed:
            kind = item.WhichOneof("item")
            if kind == "snapshot_end":
                print(f"snapshot complete at sequence {item.snapshot_end.sequence}")
                stub.UpdateOdds(
                    pb.UpdateOddsRequest(id=event_id, coefficient="2.10"),
                    metadata=auth,
                    timeout=10,
                )
            elif kind == "change":
                change = item.change
                print(f"change #{change.sequence}: {change.event.id} → {change.event.coefficient}")
                if change.event.id == event_id and change.event.coefficient == "2.10":
                    feed.cancel()
                    break
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
