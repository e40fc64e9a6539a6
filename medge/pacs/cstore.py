"""DIMSE C-STORE with pynetdicom: one association per delivery attempt, one presentation context
per (SOP class, transfer syntax) so a PACS cannot accept a context with a syntax other than the
one the file is encoded in (dicom-wsi reference §8.1)."""

from __future__ import annotations

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

from medge.pacs.base import (
    InstanceRef,
    PacsSender,
    PermanentPacsError,
    TransientPacsError,
    run_blocking,
)
from medge.pacs.config import Destination

MAX_CONTEXTS = 128
"""PS3.8: at most 128 presentation contexts per association."""
REJECT_PERMANENT = 0x01
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (service provider)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
"""Stored with coercion or elements discarded: the instance is in the PACS."""


def _status_is_transient(status: int) -> bool:
    """0xA7xx out of resources and 0x0213/0x0212 resource limitations clear up by themselves."""
    return status & 0xFF00 == 0xA700 or status in (0x0210, 0x0212, 0x0213)


def _join(association: Association, timeout: float) -> None:
    """pynetdicom runs each association in a thread; wait for it so none outlives the sender."""
    if association.ident is not None:
        association.join(timeout)


class CStoreSender(PacsSender):
    def __init__(self, destination_name: str, destination: Destination) -> None:
        super().__init__(destination_name)
        self.destination = destination
        self._association: Association | None = None

    def _make_ae(self, instances: list[InstanceRef]) -> AE:
        ae = AE(ae_title=self.destination.calling_ae)
        timeout = self.destination.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
        if len(pairs) > MAX_CONTEXTS:
            raise PermanentPacsError(
                f"{self.where()}: {len(pairs)} SOP class/transfer syntax pairs exceed the"
                f" {MAX_CONTEXTS} presentation contexts of one association"
            )
        for sop_class, syntax in pairs:
            ae.add_requested_context(sop_class, [syntax])
        return ae

    async def _do_open(self, instances: list[InstanceRef]) -> None:
        ae = self._make_ae(instances)
        destination = self.destination

        def associate() -> Association:
            return ae.associate(destination.host, destination.port,
                                ae_title=destination.called_ae)

        association = await run_blocking(associate, f"cstore-associate-{self.destination_name}")
        if association.is_established:
            self._association = association
            return
        _join(association, destination.timeout_s)
        target = f"{destination.host}:{destination.port} (called AE {destination.called_ae!r})"
        if association.is_rejected:
            primitive = association.acceptor.primitive
            result = int(getattr(primitive, "result", 0) or 0)
            source = int(getattr(primitive, "result_source", 0) or 0)
            diagnostic = int(getattr(primitive, "diagnostic", 0) or 0)
            reason = REJECT_REASONS.get(
                (source, diagnostic), f"source {source}, reason {diagnostic}"
            )
            message = f"{self.where()}: association rejected by {target}: {reason}"
            if result == REJECT_PERMANENT:
                raise PermanentPacsError(message + " (permanent; check the AE titles in config)")
            raise TransientPacsError(message + " (transient)")
        if association.rejected_contexts and not association.accepted_contexts:
            refused = ", ".join(sorted({f"{i.sop_class_uid} with {i.transfer_syntax_uid}"
                                        for i in instances}))
            raise PermanentPacsError(f"{self.where()}: {target} refused SOP class {refused}"
                                     " (no presentation context accepted)")
        raise TransientPacsError(f"{self.where()}: cannot associate with {target}:"
                                 " connection refused, aborted or timed out")

    async def _do_store(self, instance: InstanceRef) -> None:
        association = self._association
        if association is None or not association.is_established:
            raise TransientPacsError(f"{self.where(instance)}: association is not open")
        accepted = {(c.abstract_syntax, c.transfer_syntax[0])
                    for c in association.accepted_contexts}
        if (instance.sop_class_uid, instance.transfer_syntax_uid) not in accepted:
            raise PermanentPacsError(
                f"{self.where(instance)}: the PACS refused SOP class {instance.sop_class_uid}"
                f" with transfer syntax {instance.transfer_syntax_uid}"
            )

        def send() -> int | None:
            status = association.send_c_store(dcmread(instance.path))
            return int(status.Status) if "Status" in status else None

        status = await run_blocking(send, f"cstore-send-{self.destination_name}")
        if status is None:
            raise TransientPacsError(f"{self.where(instance)}: no C-STORE response"
                                     " (connection lost or timed out)")
        if status == 0x0000 or status in WARNING_STATUSES:
            return
        message = f"{self.where(instance)}: C-STORE failed with status 0x{status:04X}"
        if _status_is_transient(status):
            raise TransientPacsError(message)
        raise PermanentPacsError(message)

    async def _do_close(self) -> None:
        association, self._association = self._association, None
        if association is None:
            return

        def release() -> None:
            if association.is_established:
                association.release()
            _join(association, self.destination.timeout_s)

        await run_blocking(release, f"cstore-release-{self.destination_name}")
