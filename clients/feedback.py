"""Client of the FeedbackService: submit ratings, choices and corrections; list; export pairs;
run labelling campaigns.

    with FeedbackClient("localhost:50054") as client:
        client.submit(feedback("What is 2 + 2?", ["4.", "5."], rater_id="ann", choice=0))
        pairs, summary = client.export_preferences()
        client.create_campaign(feedback_pb2.Campaign(campaign_id="helpful-v1", judgements_per_item=3))

Every call has a deadline (`timeout_s`, default 60 s). Give each piece of feedback a
`feedback_id` of your own to make retries safe: a resubmission is stored once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from rlhf_mesh.clients.channel import Client
from rlhf_mesh.v1 import feedback_pb2, feedback_pb2_grpc

SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


def feedback(prompt: str, responses: Sequence[str], *, rater_id: str, choice: int | None = None,
             scores: Sequence[float] | None = None, scale: tuple[float, float] = (1.0, 5.0),
             correction: tuple[int, str] | None = None, tie: bool = False, both_bad: bool = False,
             feedback_id: str = "", model_id: str = "", policy_version: int = 0) -> feedback_pb2.Feedback:
    """A Feedback with exactly one judgement: `choice` (an index), `scores` (one per response,
    on `scale`), `correction` (response index, corrected text), `tie` or `both_bad`."""
    given = [j for j in (choice, scores, correction, tie or None, both_bad or None) if j is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of choice, scores, correction, tie, both_bad")
    judgement = {}
    if tie or both_bad:
        judgement["tie"] = feedback_pb2.Tie(both_bad=both_bad)
    elif choice is not None:
        judgement["choice"] = feedback_pb2.Choice(chosen_index=choice)
    elif scores is not None:
        judgement["rating"] = feedback_pb2.Rating(scores=list(scores), scale_min=scale[0], scale_max=scale[1])
    else:
        judgement["correction"] = feedback_pb2.Correction(response_index=correction[0],
                                                          corrected_response=correction[1])
    return feedback_pb2.Feedback(feedback_id=feedback_id, rater_id=rater_id, prompt=prompt, responses=list(responses),
                                 model_id=model_id, policy_version=policy_version, **judgement)


class FeedbackClient(Client):
    """Blocking client; use as a context manager or call close()."""

    service = SERVICE
    stub_class = feedback_pb2_grpc.FeedbackServiceStub

    def submit(self, item: feedback_pb2.Feedback,
               timeout_s: float | None = None) -> feedback_pb2.SubmitFeedbackResponse:
        """Store `item`; durable when this returns."""
        return self.stub.SubmitFeedback(feedback_pb2.SubmitFeedbackRequest(feedback=item),
                                        timeout=self._timeout(timeout_s))

    def list(self, *, rater_id: str = "", kind: feedback_pb2.FeedbackKind = feedback_pb2.FEEDBACK_KIND_UNSPECIFIED,
             page_size: int = 100, timeout_s: float | None = None) -> Iterator[feedback_pb2.Feedback]:
        """Every stored item that matches, oldest first, one page per call."""
        token = ""
        while True:
            page = self.stub.ListFeedback(feedback_pb2.ListFeedbackRequest(
                rater_id=rater_id, kind=kind, page_size=page_size, page_token=token), timeout=self._timeout(timeout_s))
            yield from page.feedback
            token = page.next_page_token
            if not token:
                return

    def add_rating_items(self, items: Sequence[feedback_pb2.RatingItem], campaign_id: str = "",
                         timeout_s: float | None = None) -> feedback_pb2.AddRatingItemsResponse:
        """Add prompts with their responses to a campaign (default: "default") for the rater page."""
        return self.stub.AddRatingItems(feedback_pb2.AddRatingItemsRequest(items=list(items), campaign_id=campaign_id),
                                        timeout=self._timeout(timeout_s))

    def create_campaign(self, campaign: feedback_pb2.Campaign, timeout_s: float | None = None) -> feedback_pb2.Campaign:
        """Create `campaign`; returns it as stored, defaults filled in."""
        return self.stub.CreateCampaign(feedback_pb2.CreateCampaignRequest(campaign=campaign),
                                        timeout=self._timeout(timeout_s)).campaign

    def campaigns(self, timeout_s: float | None = None) -> list[feedback_pb2.Campaign]:
        """Every campaign with its progress."""
        return list(self.stub.ListCampaigns(feedback_pb2.ListCampaignsRequest(),
                                            timeout=self._timeout(timeout_s)).campaigns)

    def campaign_stats(self, campaign_id: str = "", timeout_s: float | None = None) -> list[feedback_pb2.CampaignStats]:
        """Judgements per rater, pairwise agreement and Krippendorff's alpha, of one campaign or all."""
        return list(self.stub.ListCampaignStats(feedback_pb2.ListCampaignStatsRequest(campaign_id=campaign_id),
                                                timeout=self._timeout(timeout_s)).campaigns)

    def export_preferences(self, min_rating_margin: float = 0.0, timeout_s: float | None = None, *,
                           campaign_id: str = "", min_raters_backing: int = 0, min_agreement: float = 0.0,
                           ) -> tuple[list[feedback_pb2.PreferencePair], feedback_pb2.ExportSummary]:
        """Every (prompt, chosen, rejected) pair and the counts of what was used and skipped; with
        `min_raters_backing` or `min_agreement`, only the pairs enough of an item's raters back."""
        pairs, summary = [], None
        for part in self.stub.ExportPreferences(feedback_pb2.ExportPreferencesRequest(
                min_rating_margin=min_rating_margin, campaign_id=campaign_id, min_raters_backing=min_raters_backing,
                min_agreement=min_agreement), timeout=self._timeout(timeout_s)):
            pairs += part.pairs
            if part.HasField("summary"):
                summary = part.summary
        return pairs, summary
