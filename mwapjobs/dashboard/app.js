// mwapjobs dashboard: vanilla JavaScript over the REST API (/api/v1/queues/...).
// Every piece of data goes into the page with textContent or attributes, never as HTML.
'use strict';

(() => {
  const STATES = ['waiting', 'active', 'delayed', 'completed', 'failed'];
  const COUNTS = ['waiting', 'active', 'delayed', 'completed', 'failed', 'paused'];
  const AUTO_KEY = 'mwapjobs.autoRefresh';

  const ui = {
    csrf: '',
    queues: [],          // [{name, statsKey}]
    stats: {},           // statsKey -> counts
    queue: null,         // selected queue name
    runState: 'failed',
    page: 1,
    pageSize: 20,
    runsTotal: 0,
    detailId: null,
    refreshSeconds: 5,
    timer: null,
    refreshing: false,
    rendered: {},        // what each section last showed, to skip needless redraws
    readOnly: false,     // a viewer token: every action is hidden (and the API says 403)
    searchFields: [],
    search: null,        // {params, page} of the search shown, or null
    historyOf: null,     // {tenantId, integrationId} whose health history is open
    healthPage: 1,
  };

  const $ = (id) => document.getElementById(id);

  // -- DOM helpers: text only ----------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key === 'on') for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
      else if (key.startsWith('data-') || key.startsWith('aria-') ||
               ['title', 'type', 'colspan', 'scope', 'role'].includes(key)) {
        node.setAttribute(key, String(value));
      } else node[key] = value;
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function button(label, props, onClick) {
    return el('button', { type: 'button', ...props, on: { click: onClick } }, label);
  }

  // An action that changes something: never shown to a viewer (the API would say 403).
  function action(label, props, onClick) {
    if (ui.readOnly) return null;
    return button(label, { ...props, 'data-write': '' }, onClick);
  }

  function changed(key, value) {
    const snapshot = JSON.stringify(value);
    if (ui.rendered[key] === snapshot) return false;
    ui.rendered[key] = snapshot;
    return true;
  }

  // -- formatting ----------------------------------------------------------------------

  const pad = (n) => String(n).padStart(2, '0');

  function fmtTime(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtRelative(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    const secs = Math.round((d.getTime() - Date.now()) / 1000);
    const abs = Math.abs(secs);
    let text;
    if (abs < 60) text = `${abs} s`;
    else if (abs < 3600) text = `${Math.round(abs / 60)} min`;
    else if (abs < 172800) text = `${Math.round(abs / 360) / 10} h`;
    else text = `${Math.round(abs / 86400)} d`;
    return secs >= 0 ? `in ${text}` : `${text} ago`;
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined) return '—';
    if (ms < 0.1) return '< 0.1 ms';
    if (ms < 10) return `${ms.toFixed(1)} ms`;
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const s = Math.round(ms / 1000);
    return `${Math.floor(s / 60)} min ${s % 60} s`;
  }

  function when(iso) {
    return el('span', { class: 'when', title: iso || '' }, fmtTime(iso),
      iso ? el('small', { text: fmtRelative(iso) }) : null);
  }

  function inZone(iso, timeZone) {
    try {
      const text = new Intl.DateTimeFormat('en-GB', {
        timeZone, weekday: 'short', hour: '2-digit', minute: '2-digit', hour12: false,
      }).format(new Date(iso));
      return `${text} ${timeZone}`;
    } catch (e) {
      return '';
    }
  }

  function json(value) {
    if (value === undefined || value === null) return '—';
    try { return JSON.stringify(value, null, 2); } catch (e) { return String(value); }
  }

  function compact(value) {
    try { return JSON.stringify(value); } catch (e) { return String(value); }
  }

  const errorMessage = (err) => (err && typeof err === 'object' ? err.message || compact(err) : err);

  // -- API ------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }

  async function api(method, path, body) {
    const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
    if (method !== 'GET') init.headers['X-CSRF-Token'] = ui.csrf;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      window.location.assign('/admin/login');
      throw new ApiFailure('Your session has ended; log in again.', 401, 'auth/unauthorized');
    }
    let payload = null;
    try { payload = await response.json(); } catch (e) { payload = null; }
    if (!response.ok || !payload || payload.success !== true) {
      const error = payload && payload.error ? payload.error : {};
      throw new ApiFailure(error.message || `HTTP ${response.status}`, response.status, error.code);
    }
    return payload.data;
  }

  const q = (name) => encodeURIComponent(name);

  // -- notices ------------------------------------------------------------------------

  let noticeTimer = null;
  function notify(message, isError) {
    const box = $('notice');
    box.textContent = message;
    box.classList.toggle('error', Boolean(isError));
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { box.hidden = true; }, isError ? 12000 : 6000);
  }

  // -- location hash: which queue, state and page are shown -----------------------------

  function readHash() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    const queue = params.get('queue');
    if (queue && ui.queues.some((x) => x.name === queue)) ui.queue = queue;
    const state = params.get('state');
    if (STATES.includes(state)) ui.runState = state;
    const page = Number.parseInt(params.get('page') || '1', 10);
    ui.page = Number.isFinite(page) && page > 0 ? page : 1;
    const run = params.get('run');
    ui.detailId = run && /^[0-9a-f]{24}$/.test(run) ? run : null;
  }

  function writeHash() {
    const params = new URLSearchParams();
    if (ui.queue) {
      params.set('queue', ui.queue);
      params.set('state', ui.runState);
      if (ui.page > 1) params.set('page', String(ui.page));
    }
    if (ui.detailId) params.set('run', ui.detailId);
    const hash = params.toString();
    history.replaceState(null, '', hash ? `#${hash}` : window.location.pathname);
  }

  function select(queue, state) {
    ui.queue = queue;
    ui.runState = state;
    ui.page = 1;
    writeHash();
    refresh();
  }

  // -- queues ----------------------------------------------------------------------------

  function renderQueues() {
    if (!changed('queues', [ui.stats, ui.queue, ui.runState])) return;
    const rows = ui.queues.map(({ name, statsKey }) => {
      const counts = ui.stats[statsKey] || {};
      const isSelected = name === ui.queue;
      const cells = COUNTS.map((state) => {
        const value = counts[state] ?? 0;
        const target = state === 'paused' ? 'waiting' : state;
        const current = isSelected && target === ui.runState && state !== 'paused';
        return el('td', { class: 'num' }, button(String(value), {
          class: `count ${state}${value ? ' nonzero' : ''}${current ? ' current' : ''}`,
          'data-count': state,
          title: `Show ${target} runs of ${name}`,
        }, () => select(name, target)));
      });
      const paused = Boolean(counts.isPaused);
      return el('tr', { 'data-queue': name, class: isSelected ? 'selected' : '' },
        el('td', {}, button(name, { class: 'link queue-name', title: `Show ${name}` },
          () => select(name, isSelected ? ui.runState : (counts.failed ? 'failed' : 'waiting')))),
        el('td', {}, el('span', { class: `badge${paused ? ' paused' : ''}` },
          paused ? 'paused' : 'running')),
        cells,
        el('td', {}, action(paused ? 'Resume' : 'Pause', { 'data-action': paused ? 'resume' : 'pause' },
          () => setPaused(name, !paused))));
    });
    $('queue-rows').replaceChildren(...(rows.length ? rows
      : [el('tr', {}, el('td', { colspan: 9, class: 'empty' }, 'No queues are registered.'))]));
  }

  async function setPaused(queue, paused) {
    try {
      await api('POST', `/api/v1/queues/${q(queue)}/${paused ? 'pause' : 'resume'}`);
      notify(`Queue ${queue} ${paused ? 'paused' : 'resumed'}.`);
    } catch (err) {
      notify(`Could not ${paused ? 'pause' : 'resume'} ${queue}: ${err.message}`, true);
    }
    refresh();
  }

  // -- runs -------------------------------------------------------------------------------

  function renderTabs() {
    const counts = ui.stats[statsKeyOf(ui.queue)] || {};
    const tabs = STATES.map((state) => {
      let count = counts[state] ?? 0;
      if (state === 'waiting') count += counts.paused ?? 0;
      return el('button', {
        type: 'button', role: 'tab', 'data-state': state,
        'aria-selected': String(state === ui.runState),
        on: { click: () => select(ui.queue, state) },
      }, state, el('span', { class: 'tab-count' }, String(count)));
    });
    $('state-tabs').replaceChildren(...tabs);
    const paused = Boolean(counts.isPaused);
    const toggle = $('pause-toggle');
    toggle.textContent = paused ? 'Resume queue' : 'Pause queue';
    toggle.dataset.action = paused ? 'resume' : 'pause';
    $('clean-tools').hidden = ui.readOnly || !['completed', 'failed'].includes(ui.runState);
    $('clean').textContent = `Clean ${ui.runState}`;
    $('bulk-retry-tools').hidden = ui.readOnly || ui.runState !== 'failed' || !counts.failed;
    $('bulk-promote').hidden = ui.readOnly || ui.runState !== 'delayed' || !counts.delayed;
    toggle.hidden = ui.readOnly;
  }

  function statsKeyOf(name) {
    const found = ui.queues.find((x) => x.name === name);
    return found ? found.statsKey : name;
  }

  function runActions(run) {
    const actions = [];
    if (run.state === 'failed') {
      actions.push(action('Retry', { 'data-action': 'retry', class: 'primary' }, () => act('retry', run)));
    }
    if (run.state === 'delayed') {
      actions.push(action('Promote', { 'data-action': 'promote' }, () => act('promote', run)));
    }
    if (run.state !== 'active') {
      actions.push(action('Remove', { 'data-action': 'remove', class: 'danger' }, () => act('remove', run)));
    }
    return el('div', { class: 'actions' }, actions);
  }

  function renderRuns(result) {
    $('runs-section').hidden = false;
    $('runs-title').replaceChildren(el('span', { class: 'queue-name' }, ui.queue),
      el('span', { class: 'muted' }, ` · ${ui.runState} runs`));
    renderTabs();
    if (!changed('runs', [result, ui.queue, ui.runState, ui.detailId])) return;
    ui.runsTotal = result.total;
    const whenLabel = { delayed: 'Run at', waiting: 'Run at', active: 'Started' }[ui.runState] || 'Finished';
    $('when-col').textContent = whenLabel;
    const rows = result.items.map((run) => {
      const whenValue = { delayed: run.runAt, waiting: run.runAt, active: run.startedAt }[run.state]
        || run.finishedAt;
      const dataText = compact(run.data);
      return el('tr', { 'data-run-id': run.runId, class: run.runId === ui.detailId ? 'selected' : '' },
        el('td', {}, button(run.runId.slice(-8), { class: 'link', title: `Details of run ${run.runId}`,
          'data-action': 'details' }, () => openDetail(run.runId))),
        el('td', { class: 'mono' }, run.jobId ?? '—'),
        el('td', {}, el('div', { class: 'data-preview', title: dataText }, dataText)),
        el('td', { class: 'num' }, `${run.attemptsMade}/${run.maxAttempts ?? '?'}`),
        el('td', {}, when(run.createdAt)),
        el('td', {}, when(whenValue)),
        el('td', { class: 'num' }, fmtDuration(run.durationMs)),
        el('td', { class: 'error-text' }, run.error ? errorMessage(run.error) : ''),
        el('td', {}, runActions(run)));
    });
    $('run-rows').replaceChildren(...(rows.length ? rows
      : [el('tr', {}, el('td', { colspan: 9, class: 'empty' }, `No ${ui.runState} runs.`))]));
    const pages = Math.max(1, Math.ceil(result.total / result.pageSize));
    $('page-info').textContent = `Page ${result.page} of ${pages} · ${result.total} run${result.total === 1 ? '' : 's'}`;
    $('prev-page').disabled = result.page <= 1;
    $('next-page').disabled = result.page >= pages;
  }

  async function act(action, run) {
    const label = `run ${run.runId.slice(-8)}${run.jobId ? ` (${run.jobId})` : ''}`;
    if (action === 'remove' &&
        !window.confirm(`Remove ${label} of ${run.queue}? This deletes it for good.`)) return;
    try {
      const path = `/api/v1/queues/runs/${run.runId}`;
      const updated = action === 'remove' ? await api('DELETE', path)
        : await api('POST', `${path}/${action}`);
      const verb = { retry: 'retried', promote: 'promoted', remove: 'removed' }[action];
      notify(action === 'remove' ? `Removed ${label}.` : `${label} ${verb}: now ${updated.state}.`);
      if (action === 'remove' && ui.detailId === run.runId) closeDetail();
    } catch (err) {
      notify(`Could not ${action} ${label}: ${err.message}`, true);
    }
    refresh();
  }

  async function clean() {
    const age = Number($('clean-age').value);
    const ageText = $('clean-age').selectedOptions[0].textContent;
    if (!window.confirm(`Delete ${ageText} ${ui.runState} runs of ${ui.queue}? This cannot be undone.`)) {
      return;
    }
    try {
      const result = await api('POST', `/api/v1/queues/${q(ui.queue)}/clean`,
        { state: ui.runState, olderThan: age });
      notify(`Deleted ${result.deleted} ${ui.runState} run${result.deleted === 1 ? '' : 's'} of ${ui.queue}.`);
    } catch (err) {
      notify(`Could not clean ${ui.queue}: ${err.message}`, true);
    }
    refresh();
  }

  // -- bulk actions: the count first (a dry run), confirmed, then the action ----------------

  function fillErrorTypes(byErrorType) {
    const select = $('bulk-error-type');
    const current = select.value;
    const options = [el('option', { value: '' }, 'every error type'),
      ...Object.entries(byErrorType || {}).map(([type, n]) => el('option', { value: type }, `${type} (${n})`))];
    select.replaceChildren(...options);
    select.value = [...select.options].some((o) => o.value === current) ? current : '';
  }

  async function bulkRetry() {
    const queue = ui.queue;
    const errorType = $('bulk-error-type').value || undefined;
    try {
      const dry = await api('POST', `/api/v1/queues/${q(queue)}/retry-failed`, { dryRun: true, errorType });
      fillErrorTypes(dry.byErrorType);
      if (!dry.count) { notify(`No failed runs of ${queue} to retry${errorType ? ` (${errorType})` : ''}.`); return; }
      const kinds = Object.entries(dry.byErrorType || {}).map(([t, n]) => `${t}: ${n}`).join(', ');
      const what = `${dry.count} failed run${dry.count === 1 ? '' : 's'} of ${queue}`;
      if (!window.confirm(`Retry ${what}${errorType ? ` with error ${errorType}` : ` (${kinds})`}? ` +
          'Runs that fail from now on are not included.')) return;
      const done = await api('POST', `/api/v1/queues/${q(queue)}/retry-failed`, { errorType, asOf: dry.asOf });
      notify(`Retried ${done.retried} of ${what}` +
        (done.skipped ? `; ${done.skipped} skipped (their job id is pending again)` : '') +
        (done.more ? '; more are left: run it again' : '') + '.');
    } catch (err) {
      notify(`Could not retry the failed runs of ${queue}: ${err.message}`, true);
    }
    refresh();
  }

  async function bulkPromote() {
    const queue = ui.queue;
    try {
      const dry = await api('POST', `/api/v1/queues/${q(queue)}/promote-delayed`, { dryRun: true });
      if (!dry.count) { notify(`No delayed runs of ${queue}.`); return; }
      if (!window.confirm(`Run ${dry.count} delayed run${dry.count === 1 ? '' : 's'} of ${queue} now?`)) return;
      const done = await api('POST', `/api/v1/queues/${q(queue)}/promote-delayed`, { asOf: dry.asOf });
      notify(`Promoted ${done.promoted} delayed run${done.promoted === 1 ? '' : 's'} of ${queue}` +
        (done.more ? '; more are left: run it again' : '') + '.');
    } catch (err) {
      notify(`Could not promote the delayed runs of ${queue}: ${err.message}`, true);
    }
    refresh();
  }

  // -- find a run ---------------------------------------------------------------------------------

  function searchParams() {
    const params = new URLSearchParams();
    const job = $('search-job').value.trim();
    const field = $('search-field').value;
    const value = $('search-value').value.trim();
    if (job) params.set('jobId', job);
    if (field && value) { params.set('field', field); params.set('value', value); }
    if (!params.toString()) return null;
    if ($('search-queue').value) params.set('queue', $('search-queue').value);
    params.set('state', $('search-state').value);
    return params;
  }

  async function runSearch(page) {
    const params = ui.search ? new URLSearchParams(ui.search.params) : null;
    if (!params) return;
    params.set('page', String(page));
    params.set('pageSize', '20');
    let result;
    try {
      result = await api('GET', `/api/v1/queues/runs?${params}`);
    } catch (err) {
      notify(`Search failed: ${err.message}`, true);
      return;
    }
    ui.search.page = result.page;
    renderSearch(result);
  }

  function renderSearch(result) {
    $('search-results').hidden = false;
    $('search-clear').hidden = false;
    const rows = result.items.map((run) => el('tr', { 'data-run-id': run.runId },
      el('td', {}, button(run.runId.slice(-8), { class: 'link', title: `Details of run ${run.runId}`,
        'data-action': 'details' }, () => openDetail(run.runId))),
      el('td', { class: 'queue-name' }, run.queue),
      el('td', { class: 'mono' }, run.jobId ?? '—'),
      el('td', {}, el('span', { class: `badge ${run.state}` }, run.state)),
      el('td', {}, el('div', { class: 'data-preview', title: compact(run.data) }, compact(run.data))),
      el('td', {}, when(run.createdAt)),
      el('td', {}, when(run.finishedAt)),
      el('td', { class: 'error-text' }, run.error ? errorMessage(run.error) : '')));
    $('search-rows').replaceChildren(...(rows.length ? rows
      : [el('tr', {}, el('td', { colspan: 8, class: 'empty' }, 'No run matches.'))]));
    const pages = Math.max(1, Math.ceil(result.total / result.pageSize));
    $('search-info').textContent = `Page ${result.page} of ${pages} · ${result.total} run${result.total === 1 ? '' : 's'} found`;
    $('search-prev').disabled = result.page <= 1;
    $('search-next').disabled = result.page >= pages;
  }

  function setUpSearch() {
    $('search-field').replaceChildren(el('option', { value: '' }, '—'),
      ...ui.searchFields.map((f) => el('option', { value: f }, f)));
    if (ui.searchFields.includes('integrationId')) $('search-field').value = 'integrationId';
    $('search-queue').append(...ui.queues.map((x) => el('option', { value: x.name }, x.name)));
    $('search-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const params = searchParams();
      if (!params) { notify('Enter a job id, or a data field\'s value.', true); return; }
      ui.search = { params: params.toString(), page: 1 };
      runSearch(1);
    });
    $('search-clear').addEventListener('click', () => {
      ui.search = null;
      $('search-results').hidden = true;
      $('search-clear').hidden = true;
      $('search-job').value = '';
      $('search-value').value = '';
    });
    $('search-prev').addEventListener('click', () => runSearch(Math.max(1, ui.search.page - 1)));
    $('search-next').addEventListener('click', () => runSearch(ui.search.page + 1));
  }

  // -- run detail ----------------------------------------------------------------------------

  function openDetail(id) {
    ui.detailId = id;
    writeHash();
    refresh().then(() => $('detail-section').scrollIntoView({ behavior: 'smooth', block: 'start' }));
  }

  function closeDetail() {
    ui.detailId = null;
    $('detail-section').hidden = true;
    delete ui.rendered.detail;
    writeHash();
  }

  function renderDetail(run) {
    $('detail-section').hidden = false;
    if (!changed('detail', run)) return;
    $('detail-title').replaceChildren('Run ', el('span', { class: 'mono' }, run.runId), ' ',
      el('span', { class: `badge ${run.state}` }, run.state));
    $('detail-tools').replaceChildren(runActions(run), button('Close', {}, closeDetail));
    const fields = [
      ['Queue', run.queue], ['Job ID', run.jobId ?? '—'], ['Priority', run.priority],
      ['Attempts', `${run.attemptsMade} of ${run.maxAttempts ?? '?'}`],
      ['Created', when(run.createdAt)], ['Run at', when(run.runAt)],
      ['Started', when(run.startedAt)], ['Finished', when(run.finishedAt)],
      ['Duration', fmtDuration(run.durationMs)], ['Deadline', run.deadline ? when(run.deadline) : '—'],
      ['Stalled', String(run.stalledCount ?? 0)],
    ];
    $('detail-fields').replaceChildren(...fields.map(([label, value]) =>
      el('div', {}, el('dt', {}, label), el('dd', {}, value))));
    $('detail-data').textContent = json(run.data);
    $('detail-result').textContent = json(run.result);
    $('detail-error-box').hidden = !run.error;
    $('detail-error').textContent = run.error ? json(run.error) : '';
    const attempts = (run.attempts || []).map((a) => el('tr', {},
      el('td', { class: 'num' }, String(a.attempt ?? '')),
      el('td', {}, el('span', { class: `badge ${a.outcome || ''}` }, a.outcome || '—')),
      el('td', {}, when(a.startedAt)),
      el('td', {}, when(a.finishedAt)),
      el('td', { class: 'num' }, fmtDuration(a.durationMs)),
      el('td', { class: 'error-text' }, a.error ? errorMessage(a.error) : '')));
    $('attempt-rows').replaceChildren(...(attempts.length ? attempts
      : [el('tr', {}, el('td', { colspan: 6, class: 'empty' }, 'No attempt yet.'))]));
  }

  // -- repeats ----------------------------------------------------------------------------------

  function renderRepeats(repeats) {
    if (!changed('repeats', repeats)) return;
    const rows = repeats.map((r) => el('tr', { 'data-repeat': `${r.queue}:${r.jobId}`, class: r.paused ? 'paused-row' : '' },
      el('td', { class: 'queue-name' }, r.queue),
      el('td', { class: 'mono' }, r.jobId),
      el('td', { class: 'mono' }, r.schedule),
      el('td', {}, r.timezone),
      el('td', { 'data-last-run': r.lastRun ? r.lastRun.state : '' }, r.lastRun
        ? [button(r.lastRun.runId.slice(-8), { class: 'link', title: `Details of run ${r.lastRun.runId}`,
          'data-action': 'details' }, () => openDetail(r.lastRun.runId)), ' ',
        el('span', { class: `badge ${r.lastRun.state}` }, r.lastRun.state),
        when(r.lastRun.finishedAt || r.lastRun.createdAt),
        r.lastRun.fired ? null : el('small', { class: 'muted' }, 'run by hand')]
        : el('span', { class: 'muted' }, 'never')),
      el('td', { 'data-next-run': r.nextRunAt || '' }, r.paused
        ? el('span', { class: 'badge paused' }, 'paused')
        : r.nextRunAt
          ? [when(r.nextRunAt), r.timezone !== 'UTC' ? el('small', { class: 'muted zone-time' },
            inZone(r.nextRunAt, r.timezone)) : null]
          : 'not scheduled'),
      el('td', {}, el('div', { class: 'data-preview mono', title: compact(r.data) }, compact(r.data))),
      el('td', {}, el('div', { class: 'actions' },
        action('Run now', { 'data-action': 'repeat-run', class: 'primary' }, () => repeatAct(r, 'run')),
        action(r.paused ? 'Resume' : 'Pause', { 'data-action': r.paused ? 'repeat-resume' : 'repeat-pause' },
          () => repeatAct(r, r.paused ? 'resume' : 'pause'))))));
    $('repeat-rows').replaceChildren(...(rows.length ? rows
      : [el('tr', {}, el('td', { colspan: 8, class: 'empty' }, 'No repeat schedules.'))]));
  }

  async function repeatAct(repeat, verb) {
    const label = `${repeat.queue} / ${repeat.jobId}`;
    try {
      const result = await api('POST', `/api/v1/queues/repeats/${q(repeat.queue)}/${q(repeat.jobId)}/${verb}`);
      if (verb === 'run') {
        notify(result.created ? `${label}: run ${result.runId.slice(-8)} added, now.`
          : `${label}: a run is pending already (${result.state}).`);
      } else {
        notify(`${label} ${verb === 'pause' ? 'paused: it fires no more until resumed' : 'resumed'}.`);
      }
    } catch (err) {
      notify(`Could not ${verb} ${label}: ${err.message}`, true);
    }
    refresh();
  }

  // -- integration health (optional endpoint): counts, the failing list, providers, sweeps ----------

  const HEALTH_OUTCOMES = ['healthy', 'failing', 'error', 'expired', 'revoked', 'skipped', 'unchecked'];
  const HEALTH_PAGE = 10;

  function providerName(byProvider, id) {
    const p = (byProvider || []).find((x) => x.id === id);
    return p ? (p.name || p.slug || p.kind || id) : id;
  }

  function sweepText(sweep) {
    if (!sweep || !sweep.enabled) return [el('p', { class: 'muted' }, 'Health checks are off on this daemon.')];
    const parts = [];
    const running = sweep.running;
    if (running) {
      parts.push(el('p', { 'data-sweep': 'running' }, el('span', { class: 'badge active' }, 'sweep running'),
        ` ${running.checked} of ${running.integrations} checked, started ${fmtRelative(running.startedAt)}` +
        `${running.hurried ? ' (hurried)' : ''}`));
    }
    const last = sweep.last;
    parts.push(el('p', { 'data-sweep': 'last', class: last ? '' : 'muted' }, last
      ? `Last sweep ${fmtRelative(last.finishedAt)}: ${last.checked} checked — ${last.healthy} healthy, ` +
        `${last.failing} failing, ${last.error} error, ${last.expired} expired, ${last.revoked} revoked` +
        `${last.interrupted ? ' (interrupted)' : ''}, in ${Math.round(last.seconds)} s.`
      : `No sweep since this daemon started${sweep.schedule ? ` (${sweep.schedule.cron}, ${sweep.schedule.timezone})` : ''}.`));
    return parts;
  }

  function renderHealth(data) {
    const parts = [];
    const byHealth = data.byHealth || {};
    parts.push(stats([
      ['integrations', data.total], ['connected', data.connected],
      ...HEALTH_OUTCOMES.map((o) => [o, byHealth[o] ?? 0, ['failing', 'error'].includes(o) && byHealth[o] > 0]),
      ...Object.entries(data.byStatus || {}).map(([s, n]) => [`status ${s}`, n, s !== 'active' && n > 0]),
    ]));
    parts.push(...sweepText(data.sweep));
    const failing = data.items || [];
    parts.push(el('h3', {}, `Failing integrations (${data.matched ?? failing.length})`));
    if (!failing.length) {
      parts.push(el('p', { class: 'muted', 'data-list': 'failing' }, 'None: every checked integration answered its last check.'));
    } else {
      parts.push(el('table', { class: 'grid', 'data-list': 'failing' },
        el('thead', {}, el('tr', {}, ...['Provider', 'Tenant', 'Integration', 'Outcome', 'Reason', 'Since', 'Streak', '']
          .map((h) => el('th', { scope: 'col', class: h === 'Streak' ? 'num' : '' }, h)))),
        el('tbody', {}, ...failing.map((r) => el('tr', { 'data-integration': r.integrationId },
          el('td', {}, providerName(data.byProvider, r.providerId)),
          el('td', { class: 'mono' }, r.tenantId ?? '—'),
          el('td', { class: 'mono' }, r.integrationId),
          el('td', {}, el('span', { class: `badge ${r.outcome === 'error' || r.outcome === 'failing' ? 'failed' : 'paused'}` }, r.outcome)),
          el('td', { class: 'error-text reason' }, (r.lastResult && r.lastResult.message) || '—'),
          el('td', {}, r.failingSince ? [r.failingSinceAtLeast ? 'before ' : '', when(r.failingSince)] : '—'),
          el('td', { class: 'num' }, String(r.consecutiveFailures)),
          el('td', {}, button('History', { class: 'link', 'data-action': 'history' },
            () => openHistory(r.tenantId, r.integrationId))))))));
      const shown = (data.page - 1) * data.pageSize + failing.length;
      const more = (data.matched ?? 0) - shown;
      parts.push(el('div', { class: 'pager' },
        button('‹ Previous', { disabled: data.page <= 1, 'data-action': 'health-prev' }, () => { ui.healthPage -= 1; refreshHealth(); }),
        el('span', { class: 'muted', 'data-health-more': String(Math.max(0, more)) },
          `${shown - failing.length + 1}–${shown} of ${data.matched}${more > 0 ? ` · ${more} more` : ''}`),
        button('Next ›', { disabled: more <= 0, 'data-action': 'health-next' }, () => { ui.healthPage += 1; refreshHealth(); })));
    }
    const providers = data.byProvider || [];
    parts.push(el('h3', {}, 'By provider'));
    parts.push(el('table', { class: 'grid', 'data-list': 'providers' },
      el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Provider'), el('th', { scope: 'col', class: 'num' }, 'Total'),
        ...HEALTH_OUTCOMES.map((o) => el('th', { scope: 'col', class: 'num' }, o)))),
      el('tbody', {}, ...(providers.length ? providers.map((p) => el('tr', { 'data-provider': p.id },
        el('td', {}, `${p.name || p.slug || p.id}`, p.kind ? el('small', { class: 'muted' }, ` ${p.kind}`) : null),
        el('td', { class: 'num' }, String(p.total)),
        ...HEALTH_OUTCOMES.map((o) => el('td', { class: `num${['failing', 'error'].includes(o) && p.byHealth[o] ? ' error-text' : ''}` },
          String((p.byHealth || {})[o] ?? 0)))))
        : [el('tr', {}, el('td', { colspan: 2 + HEALTH_OUTCOMES.length, class: 'empty' }, 'No integration yet.'))]))));
    $('health').replaceChildren(...parts);
  }

  async function refreshHealth() {
    const params = new URLSearchParams({ outcome: 'failing,error', page: String(ui.healthPage), pageSize: String(HEALTH_PAGE) });
    let data = await optional(`/api/v1/integrations/health?${params}`);
    if (data && !data.items.length && ui.healthPage > 1) {  // the last page emptied
      ui.healthPage = Math.max(1, Math.ceil((data.matched || 0) / HEALTH_PAGE));
      params.set('page', String(ui.healthPage));
      data = await optional(`/api/v1/integrations/health?${params}`);
    }
    $('health-section').hidden = data === null;
    if (data === null || !changed('health', data)) return;
    renderHealth(data);
  }

  async function openHistory(tenantId, integrationId) {
    ui.historyOf = { tenantId, integrationId };
    await refreshHistory();
    $('history-section').scrollIntoView({ behavior: 'smooth', block: 'start' });
  }

  async function refreshHistory() {
    if (!ui.historyOf) return;
    const { tenantId, integrationId } = ui.historyOf;
    let data;
    try {
      data = await api('GET', `/api/v1/tenants/${q(tenantId)}/integrations/${q(integrationId)}/health`);
    } catch (err) {
      notify(`Could not read the history of ${integrationId}: ${err.message}`, true);
      ui.historyOf = null;
      $('history-section').hidden = true;
      return;
    }
    $('history-section').hidden = false;
    if (!changed('history', data)) return;
    const provider = data.provider || {};
    $('history-title').replaceChildren('Health history ', el('span', { class: 'mono' }, integrationId),
      el('span', { class: 'muted' }, ` · ${provider.name || provider.id || ''} · tenant ${tenantId} · ${data.status}`));
    const rows = (data.history || []).map((e) => el('tr', {},
      el('td', {}, when(e.at)),
      el('td', {}, el('span', { class: `badge ${e.outcome === 'healthy' ? 'completed' : (e.outcome === 'skipped' ? 'waiting' : 'failed')}` }, e.outcome)),
      el('td', { class: 'num' }, e.httpStatus ?? '—'),
      el('td', { class: 'num' }, e.latencyMs === null || e.latencyMs === undefined ? '—' : `${Math.round(e.latencyMs)} ms`),
      el('td', {}, e.refreshed ? 'yes' : ''),
      el('td', { class: 'error-text' }, e.outcome === 'healthy' ? '' : (e.message || ''))));
    $('history').replaceChildren(
      stats([['outcome', data.health.outcome], ['streak', data.health.consecutiveFailures, data.health.consecutiveFailures > 0],
        ['last healthy', data.health.lastHealthyAt ? fmtRelative(data.health.lastHealthyAt) : 'never']]),
      el('table', { class: 'grid', 'data-list': 'history' },
        el('thead', {}, el('tr', {}, ...['Checked', 'Outcome', 'HTTP', 'Latency', 'Refreshed', 'Message']
          .map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 6, class: 'empty' }, 'Never checked.'))]))));
  }

  // -- throughput: completed (up) and failed (down) per minute, drawn as SVG bars ------------------

  function throughputChart(name, series, from) {
    const n = series.completed.length;
    const w = 1440, h = 84, mid = 56;
    const max = Math.max(1, ...series.completed, ...series.failed);
    const step = w / n;
    const start = new Date(from).getTime();
    const label = (i) => fmtTime(new Date(start + i * 60000).toISOString()).slice(11, 16);
    const bars = [];
    series.completed.forEach((v, i) => {
      if (!v) return;
      const height = Math.max(1, (v / max) * (mid - 2));
      bars.push(svg('rect', { x: (i * step).toFixed(2), y: (mid - height).toFixed(2), width: Math.max(3, step).toFixed(2),
        height: height.toFixed(2), class: 'tp-completed', 'data-minute': i, 'data-count': v },
      svg('title', {}, `${label(i)}: ${v} completed`)));
    });
    series.failed.forEach((v, i) => {
      if (!v) return;
      const height = Math.max(1, (v / max) * (h - mid - 2));
      bars.push(svg('rect', { x: (i * step).toFixed(2), y: mid, width: Math.max(3, step).toFixed(2),
        height: height.toFixed(2), class: 'tp-failed', 'data-minute': i, 'data-count': v },
      svg('title', {}, `${label(i)}: ${v} failed`)));
    });
    const ticks = [];
    for (let i = 0; i < n; i += 180) ticks.push(svg('line', { x1: i * step, x2: i * step, y1: 0, y2: h, class: 'tp-tick' }));
    const chart = svg('svg', { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: 'none', class: 'tp-chart', role: 'img',
      'aria-label': `${name}: ${series.total.completed} completed and ${series.total.failed} failed in 24 hours` },
    ...ticks, svg('line', { x1: 0, x2: w, y1: mid, y2: mid, class: 'tp-axis' }), ...bars);
    const peak = Math.max(0, ...series.completed.map((c, i) => c + series.failed[i]));
    return el('div', { class: 'tp-row', 'data-throughput': name, 'data-completed': series.total.completed,
      'data-failed': series.total.failed },
    el('div', { class: 'tp-head' }, el('span', { class: 'queue-name' }, name),
      el('span', { class: 'muted' }, `${series.total.completed} completed · `),
      el('span', { class: series.total.failed ? 'error-text' : 'muted' }, `${series.total.failed} failed`),
      el('span', { class: 'muted' }, ` · peak ${peak}/min`)),
    chart,
    el('div', { class: 'tp-scale muted' }, el('span', {}, label(0)), el('span', {}, label(Math.floor(n / 2))), el('span', {}, label(n - 1))));
  }

  async function refreshThroughput() {
    const data = await api('GET', '/api/v1/queues/throughput');
    if (!changed('throughput', data)) return;
    const rows = Object.entries(data.queues).map(([name, series]) => throughputChart(name, series, data.from));
    $('throughput').replaceChildren(...(rows.length ? rows : [el('p', { class: 'muted' }, 'No queues.')]));
  }

  // -- job panels: each hidden unless its endpoint answers 200 --------------------------------------

  async function optional(path) {
    try {
      const response = await fetch(path,
        { credentials: 'same-origin', headers: { Accept: 'application/json' } });
      if (response.status !== 200) return null;
      const payload = await response.json();
      return payload && payload.success === true ? payload.data : null;
    } catch (e) {
      return null;
    }
  }

  function stats(pairs) {
    return el('div', { class: 'health' }, ...pairs.map(([key, value, warn]) =>
      el('div', { class: warn ? 'stat warn' : 'stat', 'data-stat': key },
        el('b', {}, String(value ?? '—')), el('span', {}, key))));
  }

  function total(items, key) {
    return items.reduce((n, item) => n + Number(item[key] || 0), 0);
  }

  async function refreshMaintenance() {
    const data = await optional('/api/v1/maintenance/report');
    $('maintenance-section').hidden = data === null;
    if (data === null || !changed('maintenance', data)) return;
    const report = data.report;
    const parts = [];
    if (!data.enabled) parts.push(el('p', { class: 'muted' }, 'Upkeep is off on this daemon.'));
    if (!report) {
      parts.push(el('p', { class: 'muted' },
        `No upkeep run yet (${data.schedule.cron}, ${data.schedule.timezone}).`));
    } else {
      const retention = Object.values(report.retention || {});
      const missing = (report.indexes || []).filter((i) => !i.present);
      parts.push(stats([
        ['last run', fmtRelative(report.finishedAt)],
        ['flows reset', (report.flows || {}).reset ?? 0],
        ['archived', total(retention, 'archived')],
        ['deleted', total(retention, 'deleted')],
        ...Object.entries(report.orphans || {}).map(([kind, o]) => [kind, o.count, o.count > 0]),
        ['missing indexes', missing.length, missing.length > 0],
      ]));
      if (missing.length) {
        parts.push(el('ul', { class: 'findings', 'data-list': 'missing-indexes' }, ...missing.map((i) =>
          el('li', {}, `${i.owner}: ${i.collection} {${Object.keys(i.keys).join(', ')}}${i.unique ? ' unique' : ''}`))));
      }
      if (report.archive && report.archive.error) {
        parts.push(el('p', { class: 'error-text' }, `Archive: ${report.archive.error}`));
      }
      if (report.budgetExhausted) {
        parts.push(el('p', { class: 'muted' }, 'The time budget ran out; the rest waits for the next run.'));
      }
    }
    $('maintenance').replaceChildren(...parts);
  }

  async function refreshOwnerEmails() {
    const data = await optional('/api/v1/notifications/owner-emails');
    $('owner-emails-section').hidden = data === null;
    if (data === null || !changed('ownerEmails', data)) return;
    const parts = [];
    if (!data.enabled) {
      parts.push(el('p', { class: 'muted' },
        `Off: tenant notifications go to the operators' channels (${(data.offBecause || []).join('; ')}).`));
    }
    const week = data.lastWeek || {};
    parts.push(stats([
      ['waiting', week.pending ?? 0],
      ['retrying', week.retrying ?? 0, (week.retrying || 0) > 0],
      ['emailed (7 days)', week.emailed ?? 0],
      ['to operators (7 days)', week.toOperators ?? 0],
      ['owner addresses', (data.contacts || {}).addresses ?? 0],
    ]));
    if (data.auth0 && data.auth0.lastError) {
      parts.push(el('p', { class: 'error-text' }, `Auth0: ${data.auth0.lastError}`));
    }
    const recent = data.recent || [];
    if (recent.length) {
      parts.push(el('ul', { class: 'findings', 'data-list': 'owner-emails' }, ...recent.slice(0, 10).map((n) =>
        el('li', {}, `${fmtTime(n.createdAt)} ${n.kind}: ${n.route === 'owner'
          ? (n.duplicate ? `already told ${n.to}` : `emailed ${n.to}${n.digest > 1 ? ` (digest of ${n.digest})` : ''}`)
          : `operators (${n.routeReason || 'no address'})`}`))));
    }
    $('owner-emails').replaceChildren(...parts);
  }

  // -- analytics: the platform's trend, drawn as SVG sparklines (no library) ---------------------

  const SVG_NS = 'http://www.w3.org/2000/svg';

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child);
    return node;
  }

  function sparkline(label, points, format) {
    const w = 220, h = 48, pad = 4;
    const values = points.map((p) => p[1]);
    const max = Math.max(1, ...values), min = Math.min(0, ...values);
    const x = (i) => pad + (points.length < 2 ? (w - 2 * pad) / 2 : i * (w - 2 * pad) / (points.length - 1));
    const y = (v) => h - pad - ((v - min) * (h - 2 * pad)) / (max - min || 1);
    const line = points.map((p, i) => `${i ? 'L' : 'M'}${x(i).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ');
    const chart = svg('svg', { viewBox: `0 0 ${w} ${h}`, width: w, height: h, class: 'spark', role: 'img',
      'aria-label': `${label}, ${points.length} day${points.length === 1 ? '' : 's'}` },
    svg('path', { d: line || 'M0,0', class: 'spark-line' }),
    ...points.map((p, i) => svg('circle', { cx: x(i).toFixed(1), cy: y(p[1]).toFixed(1), r: 2, class: 'spark-dot' },
      svg('title', {}, `${p[0]}: ${format(p[1])}`))));
    const last = points.length ? format(points[points.length - 1][1]) : '—';
    return el('div', { class: 'trend', 'data-trend': label }, el('span', {}, label), el('b', {}, last), chart);
  }

  function gib(bytes) {
    return `${(Number(bytes || 0) / 2 ** 30).toFixed(1)} GiB`;
  }

  async function refreshAnalytics() {
    const data = await optional('/api/v1/analytics');
    $('analytics-section').hidden = data === null;
    if (data === null || !changed('analytics', data)) return;
    const days = data.days || [];
    if (!days.length) {
      $('analytics').replaceChildren(el('p', { class: 'muted' },
        data.enabled ? 'No daily snapshot yet.' : 'Analytics is off on this daemon.'));
      return;
    }
    const series = (pick) => days.map((d) => [d.day, Number(pick(d) || 0)]);
    const count = (n) => String(n);
    const failures = (d) => (d.refresh || {}).transientFailure + (d.refresh || {}).permanentFailure;
    $('analytics').replaceChildren(el('div', { class: 'trends' },
      sparkline('tenants', series((d) => d.tenants), count),
      sparkline('projects', series((d) => (d.projects || {}).total), count),
      sparkline('connected integrations', series((d) => (d.integrations || {}).connected), count),
      sparkline('refreshes', series((d) => (d.refresh || {}).refreshed), count),
      sparkline('refresh failures', series(failures), count),
      sparkline('storage used', series((d) => (d.quota || {}).used), gib)),
    el('p', { class: 'muted' }, `${data.from} to ${data.to}, ${days.length} daily snapshot${days.length === 1 ? '' : 's'}`));
  }

  // -- file index: per-project summaries, failing ones first ------------------------------------

  async function refreshFileIndex() {
    const data = await optional('/api/v1/files/index?pageSize=20');
    $('file-index-section').hidden = data === null;
    if (data === null || !changed('fileIndex', data)) return;
    const parts = [];
    if (!data.enabled) parts.push(el('p', { class: 'muted' }, 'File indexing is off on this daemon.'));
    const by = data.byState || {};
    parts.push(stats([
      ['projects', data.total ?? 0],
      ['synced', by.synced ?? 0],
      ['running', data.running ?? 0],
      ['failing', by.error ?? 0, (by.error || 0) > 0],
      ['not indexed', by.skipped ?? 0],
      ['files', data.files ?? 0],
      ['size', gib(data.totalSize)],
    ]));
    const items = data.items || [];
    if (items.length) {
      parts.push(el('table', { class: 'grid', 'data-list': 'file-index' },
        el('thead', {}, el('tr', {}, ...['Project', 'Provider', 'Folder', 'State', 'Files', 'Size', 'Last sync', 'Last error']
          .map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...items.map((p) => el('tr', { 'data-project': p.projectId },
          el('td', { class: 'mono' }, p.name || p.projectId),
          el('td', {}, p.provider || '—'),
          el('td', { class: 'mono' }, p.folderpath || '—'),
          el('td', { class: p.state === 'error' ? 'error-text' : '' }, p.state),
          el('td', { class: 'num' }, String(p.fileCount)),
          el('td', { class: 'num' }, gib(p.totalSize)),
          el('td', {}, p.lastSync ? fmtRelative(p.lastSync) : 'never'),
          el('td', {}, p.lastError ? `${p.lastError.code}: ${p.lastError.message}` : (p.skipReason || '')))))));
    } else {
      parts.push(el('p', { class: 'muted' }, 'No project indexed yet.'));
    }
    $('file-index').replaceChildren(...parts);
  }

  // -- refresh loop ------------------------------------------------------------------------------

  async function refresh() {
    if (ui.refreshing) { ui.again = true; return; }
    ui.refreshing = true;
    try {
      const [stats, repeats] = await Promise.all([
        api('GET', '/api/v1/queues/stats'),
        api('GET', '/api/v1/queues/repeats'),
      ]);
      ui.stats = stats;
      renderQueues();
      renderRepeats(repeats);
      await refreshThroughput();
      if (ui.queue) {
        const params = new URLSearchParams({ state: ui.runState, page: ui.page, pageSize: ui.pageSize });
        let runs = await api('GET', `/api/v1/queues/${q(ui.queue)}/runs?${params}`);
        const pages = Math.max(1, Math.ceil(runs.total / runs.pageSize));
        if (ui.page > pages) {  // the last page emptied (a retry, a clean): show the new last one
          ui.page = pages;
          writeHash();
          params.set('page', String(ui.page));
          runs = await api('GET', `/api/v1/queues/${q(ui.queue)}/runs?${params}`);
        }
        renderRuns(runs);
      }
      if (ui.detailId) {
        try {
          renderDetail(await api('GET', `/api/v1/queues/runs/${ui.detailId}`));
        } catch (err) {
          if (err.status !== 404) throw err;
          notify('That run no longer exists (removed or cleaned).', true);
          closeDetail();
        }
      }
      await refreshHealth();
      await refreshHistory();
      await refreshMaintenance();
      await refreshOwnerEmails();
      await refreshAnalytics();
      await refreshFileIndex();
      $('updated').textContent = `Updated ${fmtTime(new Date().toISOString()).slice(11)}`;
      document.body.dataset.loaded = 'true';
    } catch (err) {
      if (err.status !== 401) notify(`Refresh failed: ${err.message}`, true);
    } finally {
      ui.refreshing = false;
      if (ui.again) { ui.again = false; refresh(); }
    }
  }

  function schedule() {
    clearInterval(ui.timer);
    ui.timer = null;
    if ($('auto-refresh').checked) {
      ui.timer = setInterval(() => { if (!document.hidden) refresh(); }, ui.refreshSeconds * 1000);
    }
  }

  async function logout() {
    try { await api('POST', '/admin/logout'); } catch (e) { /* going to the login page anyway */ }
    window.location.assign('/admin/login');
  }

  async function start() {
    let session;
    try {
      session = await api('GET', '/admin/session');
    } catch (err) {
      if (err.status !== 401) notify(`Cannot start: ${err.message}`, true);
      return;
    }
    ui.csrf = session.csrfToken;
    ui.queues = session.queues;
    ui.refreshSeconds = session.refreshSeconds || 5;
    ui.readOnly = Boolean(session.readOnly);
    ui.searchFields = session.searchFields || [];
    document.body.classList.toggle('read-only', ui.readOnly);
    $('read-only').hidden = !ui.readOnly;
    $('actor').textContent = session.actor;
    setUpSearch();
    $('refresh-period').textContent = `(${ui.refreshSeconds} s)`;
    readHash();

    const auto = $('auto-refresh');
    auto.checked = window.localStorage.getItem(AUTO_KEY) !== 'off';
    auto.addEventListener('change', () => {
      window.localStorage.setItem(AUTO_KEY, auto.checked ? 'on' : 'off');
      schedule();
    });
    $('refresh-now').addEventListener('click', () => refresh());
    $('logout').addEventListener('click', logout);
    $('prev-page').addEventListener('click', () => { ui.page = Math.max(1, ui.page - 1); writeHash(); refresh(); });
    $('next-page').addEventListener('click', () => { ui.page += 1; writeHash(); refresh(); });
    $('page-size').addEventListener('change', (e) => {
      ui.pageSize = Number(e.target.value);
      ui.page = 1;
      writeHash();
      refresh();
    });
    $('pause-toggle').addEventListener('click', (e) => setPaused(ui.queue, e.target.dataset.action === 'pause'));
    $('clean').addEventListener('click', clean);
    $('bulk-retry').addEventListener('click', bulkRetry);
    $('bulk-promote').addEventListener('click', bulkPromote);
    $('history-close').addEventListener('click', () => {
      ui.historyOf = null;
      delete ui.rendered.history;
      $('history-section').hidden = true;
    });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
    window.addEventListener('hashchange', () => { readHash(); refresh(); });
    schedule();
    await refresh();
  }

  document.addEventListener('DOMContentLoaded', start);
})();
