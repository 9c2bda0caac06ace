"""The training-style example record shared by Fisher, training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One supervised example.

    Either ``prompt`` + ``response`` (single user turn, one assistant answer), or ``messages``: a chat list
    ``[{"role": ..., "content": ...}, ...]`` whose **last** message is the assistant answer. The loss (and
    the Fisher) covers only the tokens of that final assistant answer.
    """

    prompt: str | None = None
    response: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def chat(self) -> list[dict[str, str]]:
        """The conversation *including* the final assistant answer, as chat-template messages."""
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages]
        return [{"role": "user", "content": self.prompt or ""}, {"role": "assistant", "content": self.response or ""}]

    def context(self) -> list[dict[str, str]]:
        """The conversation *without* the final assistant answer (what the model is conditioned on)."""
        return self.chat()[:-1]

    def answer(self) -> str:
        """The final assistant answer (the supervised target)."""
        return self.chat()[-1]["content"]
