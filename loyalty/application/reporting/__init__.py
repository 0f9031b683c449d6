"""Reporting that outlives retention: daily rollups, the daily report, the export.

Two kinds of facts are rolled up per UTC day and kept forever (small: no user id, one
row per day x source x event type x shard, and one per day):

- **activity** (from the pipeline, in the transaction of the window's checkpoint
  compare-and-set, so a window is counted exactly once): per day x source x event type,
  the events, the events that earned (a non-zero weight: not an unknown type, not beyond
  a daily cap, not weighed zero), a sketch of the distinct members
  (``loyalty.domain.sketch``), and the currency and rank points *awarded*: the exact
  decimal sum of the events' weights, before any rounding. What members are *credited*
  is whole units of their running exact total (see the pending earnings), so the credited
  figures below differ from the awarded ones by the fractions still carried on accounts
  and by earnings still pending.
- **accounts** (from the member projection, with its tracking position in one
  transaction): per day of the event's timestamp, whole currency and rank points
  credited by awards, currency spent, refunded, adjusted (and rank points adjusted),
  expired (``Member.CurrencyExpired``), forgotten (balances erased by forget-me), new
  accounts, and the changes of the members with a balance and of the members per rank.
  End-of-day levels (outstanding currency, members with a balance, members per rank)
  are the running sums of those changes over every day up to the day.

The projection counts an event in the rollups only once: a rollup watermark (its own
tracking position, which a read-model rebuild leaves alone) says which events were
already counted, so a rebuild re-projects balances without counting history twice (and
without losing the days of members forgotten since).

The report (:func:`daily_report`) reads only the rollups, so a day reads the same after
retention dropped its activity. The export (:func:`export`) hands the rollups and the
account events to a sink (Parquet files, ``adapters/parquet_export.py``), each member as
an HMAC-SHA256 pseudonym under the deployment's export key.
"""

from loyalty.application.reporting.export import (
    DATASETS,
    AccountEventRow,
    EventColumns,
    ExportRefused,
    ExportResult,
    ExportSink,
    MembersLog,
    NotificationLog,
    account_event_columns,
    account_event_rows,
    export,
    pseudonym,
)
from loyalty.application.reporting.report import (
    DAY_COLUMNS,
    FIGURE_LABELS,
    MAX_REPORT_DAYS,
    TODAY_FIGURES,
    ActivityRow,
    DayReport,
    ReportRangeError,
    RollupReader,
    StoredActivity,
    check_range,
    daily_report,
    today_report,
)
from loyalty.application.reporting.rollups import (
    EXPIRED_EVENT,
    AccountDay,
    AccountFact,
    ActivityCell,
    ActivityFacts,
    ActivityKey,
    account_facts,
    fold_accounts,
    forgotten_day,
)

__all__ = [
    "DATASETS",
    "DAY_COLUMNS",
    "EXPIRED_EVENT",
    "FIGURE_LABELS",
    "MAX_REPORT_DAYS",
    "TODAY_FIGURES",
    "AccountDay",
    "AccountEventRow",
    "AccountFact",
    "ActivityCell",
    "ActivityFacts",
    "ActivityKey",
    "ActivityRow",
    "DayReport",
    "EventColumns",
    "ExportRefused",
    "ExportResult",
    "ExportSink",
    "MembersLog",
    "NotificationLog",
    "ReportRangeError",
    "RollupReader",
    "StoredActivity",
    "account_event_columns",
    "account_event_rows",
    "account_facts",
    "check_range",
    "daily_report",
    "export",
    "fold_accounts",
    "forgotten_day",
    "pseudonym",
    "today_report",
]
