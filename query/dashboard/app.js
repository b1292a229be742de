// The provider dashboard: draws every page from the query API's JSON.
//
// Figures are written with textContent only (never as HTML). Each figure
// carries the raw number it shows (data-value), its format (data-format)
// and where it comes from: the nearest [data-source] names the API request,
// data-figure the path of the number in that response. The browser tests
// read the page through these and compare it with the API.
'use strict';

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const page = $('#page');
  const state = { session: null, render: 0 };

  // ---------------------------------------------------------------- format
  // How figures are shown (README, "The dashboard"): integers grouped;
  // USD with no cents from $100, cents from $0.01, four decimals below;
  // percents with one decimal; dates as YYYY-MM-DD, times as
  // YYYY-MM-DD HH:MM UTC.
  const grouped = (digits) =>
    new Intl.NumberFormat('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
  const INT = grouped(0);
  const DEC1 = grouped(1);
  const DEC2 = grouped(2);
  const DEC4 = grouped(4);

  function fmtInt(v) {
    return INT.format(v);
  }
  function fmtUsd(v) {
    const a = Math.abs(v);
    const sign = v < 0 ? '-' : '';
    if (a === 0) return '$0.00';
    if (a >= 100) return `${sign}$${INT.format(a)}`;
    if (a >= 0.01) return `${sign}$${DEC2.format(a)}`;
    return `${sign}$${DEC4.format(a)}`;
  }
  function fmtPct(v) {
    return `${DEC1.format(v)}%`;
  }
  function fmtDec1(v) {
    return DEC1.format(v);
  }
  function fmtDec2(v) {
    return DEC2.format(v);
  }
  const FORMATS = { int: fmtInt, usd: fmtUsd, pct: fmtPct, dec1: fmtDec1, dec2: fmtDec2 };
  function fmtTime(iso) {
    if (!iso || iso.startsWith('1970-01-01')) return '—';
    return `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
  }

  // ------------------------------------------------------------------- DOM
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  /** A figure: the formatted number, with what it is. */
  function fig(value, format, path) {
    const shown = value === null || value === undefined ? '—' : FORMATS[format](value);
    return h('span', {
      'data-figure': path,
      'data-format': format,
      'data-value': value === null || value === undefined ? '' : String(value),
      text: shown,
    });
  }

  function numCell(value, format, path, extra) {
    return h('td', { class: `num${value < 0 ? ' negative' : ''}${extra ? ` ${extra}` : ''}` }, fig(value, format, path));
  }

  function panel(title, ...kids) {
    return h('section', { class: 'panel' }, title ? h('h2', { text: title }) : null, ...kids);
  }

  function sourced(url, ...kids) {
    return h('div', { 'data-source': url }, ...kids);
  }

  function installLink(id, extra) {
    return h('a', { href: `#/installations/${encodeURIComponent(id)}${extra || ''}`, class: 'mono', text: id });
  }

  function badge(level) {
    return h('span', { class: `badge ${level}`, text: level });
  }

  function table({ caption, head, rows, empty }) {
    if (!rows.length) return h('p', { class: 'empty', text: empty || 'Nothing to show.' });
    return h(
      'div',
      { class: 'table-wrap' },
      h(
        'table',
        {},
        caption ? h('caption', { text: caption }) : null,
        h('thead', {}, h('tr', {}, head.map(([label, num]) => h('th', { scope: 'col', class: num ? 'num' : null, text: label })))),
        h('tbody', {}, rows),
      ),
    );
  }

  function kpi(title, big, rows, caption) {
    return h(
      'section',
      { class: 'panel kpi' },
      h('h2', { text: title }),
      h('div', { class: 'big' }, big),
      caption ? h('div', { class: 'caption', text: caption }) : null,
      rows && rows.length ? h('dl', {}, rows.flatMap(([label, value]) => [h('dt', { text: label }), h('dd', {}, value)])) : null,
    );
  }

  // ------------------------------------------------------------------ dates
  const DAY = 86400000;
  function isoDay(ms) {
    return new Date(ms).toISOString().slice(0, 10);
  }
  function todayUtc() {
    return isoDay(Date.now());
  }
  function addDays(day, n) {
    return isoDay(Date.parse(`${day}T00:00:00Z`) + n * DAY);
  }
  function monthStart(day, back) {
    const d = new Date(`${day}T00:00:00Z`);
    d.setUTCDate(1);
    d.setUTCMonth(d.getUTCMonth() - (back || 0));
    return d.toISOString().slice(0, 10);
  }
  function daysBetween(from, to) {
    const out = [];
    for (let d = from; d <= to; d = addDays(d, 1)) out.push(d);
    return out;
  }

  // -------------------------------------------------------------------- API
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(url, options) {
    let response;
    try {
      response = await fetch(url, { credentials: 'same-origin', ...(options || {}) });
    } catch (e) {
      throw new ApiError(0, 'network', 'The query service cannot be reached. Check that it is running, then retry.');
    }
    const type = response.headers.get('content-type') || '';
    if (!response.ok) {
      let body = {};
      if (type.includes('json')) body = await response.json().catch(() => ({}));
      throw new ApiError(response.status, body.error || 'error', body.message || `HTTP ${response.status}`);
    }
    if (options && options.raw) return response;
    return response.json();
  }

  function sendJson(method, url, body) {
    return api(url, {
      method,
      headers: { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      raw: method === 'POST' && url.startsWith('/api/usage/export'),
    });
  }

  // ----------------------------------------------------------------- charts
  const SVG = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    for (const kid of kids.flat()) if (kid) el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    return el;
  }

  function niceTicks(max) {
    if (!(max > 0)) return [0, 1];
    const raw = max / 4;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw);
    const ticks = [];
    for (let v = 0; v < max + step * 1e-9; v += step) ticks.push(v);
    ticks.push(ticks[ticks.length - 1] + step);
    return ticks;
  }

  function axisFormat(format) {
    if (format === 'usd') return (v) => (v >= 100 ? `$${INT.format(v)}` : `$${grouped(v < 1 && v > 0 ? 2 : 0).format(v)}`);
    if (format === 'pct') return (v) => `${INT.format(v)}%`;
    return (v) => (v >= 10000 ? `${INT.format(v / 1000)}k` : INT.format(v));
  }

  function legend(items) {
    return h(
      'ul',
      { class: 'legend' },
      items.map((it) => h('li', {}, h('span', { class: `key ${it.cls}${it.dashed ? ' dashed' : ''}`, 'aria-hidden': 'true' }), it.name)),
    );
  }

  /** An accessible data table under a chart. */
  function chartTable(labels, columns) {
    return h(
      'details',
      {},
      h('summary', { text: 'Data as a table' }),
      table({
        head: [['', false], ...columns.map((c) => [c.name, true])],
        rows: labels.map((label, i) =>
          h('tr', {}, h('th', { scope: 'row', text: label }), columns.map((c) => h('td', { class: 'num', text: c.values[i] === null || c.values[i] === undefined ? '—' : FORMATS[c.format](c.values[i]) }))),
        ),
      }),
    );
  }

  /**
   * A line chart. labels: x values (days or months); series: [{name,
   * values, cls, dashed}]; band: {low, high, cls}; marks: [{index, label,
   * cls}]; unit: the y axis title; format: of the y values; xTitle.
   */
  function lineChart({ title, labels, series, band, marks, unit, format, xTitle, height, half }) {
    const W = chartWidth(half);
    const H = height || 250;
    const m = { l: 78, r: 14, t: 16, b: 44 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const all = series.flatMap((x) => x.values).concat(band ? band.high : []).filter((v) => v !== null && v !== undefined);
    const ticks = niceTicks(Math.max(0, ...all));
    const top = ticks[ticks.length - 1];
    const x = (i) => m.l + (labels.length <= 1 ? pw / 2 : (i * pw) / (labels.length - 1));
    const y = (v) => m.t + ph - (v / top) * ph;
    const f = axisFormat(format);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': title }, s('title', {}, title));
    for (const t of ticks) {
      svg.append(s('line', { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t), class: 'grid-line' }));
      svg.append(s('text', { x: m.l - 6, y: y(t) + 4, 'text-anchor': 'end' }, f(t)));
    }
    svg.append(s('line', { x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph, class: 'axis' }));
    svg.append(s('line', { x1: m.l, x2: W - m.r, y1: m.t + ph, y2: m.t + ph, class: 'axis' }));
    const every = Math.max(1, Math.ceil(labels.length / Math.max(3, Math.floor(pw / 70))));
    labels.forEach((label, i) => {
      const last = i === labels.length - 1 && i % every >= every / 2;
      if (i % every === 0 || last) {
        svg.append(s('text', { x: x(i), y: m.t + ph + 16, 'text-anchor': 'middle' }, label.length === 10 ? label.slice(5) : label));
      }
    });
    svg.append(s('text', { x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle' }, xTitle || 'Day (UTC)'));
    svg.append(s('text', { x: 12, y: m.t + ph / 2, 'text-anchor': 'middle', transform: `rotate(-90 12 ${m.t + ph / 2})` }, unit));
    if (band) {
      const idx = band.low.map((v, i) => (v === null || v === undefined ? null : i)).filter((i) => i !== null);
      if (idx.length) {
        const d =
          idx.map((i, k) => `${k ? 'L' : 'M'}${x(i).toFixed(1)},${y(band.high[i]).toFixed(1)}`).join('') +
          idx
            .slice()
            .reverse()
            .map((i) => `L${x(i).toFixed(1)},${y(band.low[i]).toFixed(1)}`)
            .join('') +
          'Z';
        svg.append(s('path', { d, class: `band ${band.cls}` }));
      }
    }
    for (const mk of marks || []) {
      if (mk.index < 0 || mk.index >= labels.length) continue;
      svg.append(s('line', { x1: x(mk.index), x2: x(mk.index), y1: m.t, y2: m.t + ph, class: `mark ${mk.cls}` }, s('title', {}, mk.title || mk.label)));
      svg.append(s('text', { x: x(mk.index) + 3, y: m.t + 9 + (mk.row || 0) * 11, class: 'mark-label' }, mk.label));
    }
    for (const se of series) {
      let d = '';
      let pen = false;
      se.values.forEach((v, i) => {
        if (v === null || v === undefined) {
          pen = false;
          return;
        }
        d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      if (d) svg.append(s('path', { d, class: `line ${se.cls}${se.dashed ? ' dashed' : ''}`, 'data-series': se.name }));
      if (labels.length === 1 && se.values[0] !== null) svg.append(s('circle', { cx: x(0), cy: y(se.values[0]), r: 3, class: se.cls }));
    }
    return h(
      'figure',
      { style: null },
      svg,
      legend(series.map((x) => ({ name: x.name, cls: x.cls, dashed: x.dashed })).concat(band ? [{ name: band.name, cls: band.cls }] : [])),
      chartTable(labels, series.map((x) => ({ name: x.name, values: x.values, format })).concat(band ? [{ name: `${band.name}, low`, values: band.low, format }, { name: `${band.name}, high`, values: band.high, format }] : [])),
    );
  }

  /** Stacked bars per label (e.g. month): stacks [{name, values, cls}]. */
  function stackedBars({ title, labels, stacks, unit, format, xTitle, max, half }) {
    const W = chartWidth(half);
    const H = 250;
    const m = { l: 78, r: 14, t: 16, b: 44 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const totals = labels.map((_, i) => stacks.reduce((a, st) => a + (st.values[i] || 0), 0));
    const ticks = max ? [0, max / 4, max / 2, (3 * max) / 4, max] : niceTicks(Math.max(0, ...totals));
    const top = ticks[ticks.length - 1];
    const y = (v) => m.t + ph - (Math.min(v, top) / top) * ph;
    const slot = pw / Math.max(1, labels.length);
    const f = axisFormat(format);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': title }, s('title', {}, title));
    for (const t of ticks) {
      svg.append(s('line', { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t), class: 'grid-line' }));
      svg.append(s('text', { x: m.l - 6, y: y(t) + 4, 'text-anchor': 'end' }, f(t)));
    }
    const every = Math.max(1, Math.ceil((labels.length * 60) / pw));
    labels.forEach((label, i) => {
      let base = 0;
      stacks.forEach((st) => {
        const v = st.values[i] || 0;
        if (v > 0) {
          svg.append(
            s('rect', { x: m.l + i * slot + slot * 0.15, width: slot * 0.7, y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)), class: st.cls, 'data-series': st.name }, s('title', {}, `${label} ${st.name}: ${FORMATS[format](v)}`)),
          );
        }
        base += v;
      });
      if (i % every === 0) svg.append(s('text', { x: m.l + i * slot + slot / 2, y: m.t + ph + 16, 'text-anchor': 'middle' }, label));
    });
    svg.append(s('line', { x1: m.l, x2: W - m.r, y1: m.t + ph, y2: m.t + ph, class: 'axis' }));
    svg.append(s('text', { x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle' }, xTitle || 'Month (UTC)'));
    svg.append(s('text', { x: 12, y: m.t + ph / 2, 'text-anchor': 'middle', transform: `rotate(-90 12 ${m.t + ph / 2})` }, unit));
    return h('figure', {}, svg, legend(stacks), chartTable(labels, stacks.map((st) => ({ name: st.name, values: st.values, format }))));
  }

  /** Horizontal bars: items [{label, value}]. */
  function hBars({ title, items, format, unit, half }) {
    const W = chartWidth(half);
    const row = 26;
    const m = { l: 120, r: 80, t: 8, b: 30 };
    const H = m.t + m.b + row * items.length;
    const max = Math.max(0, ...items.map((i) => i.value));
    const pw = W - m.l - m.r;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': title }, s('title', {}, title));
    items.forEach((it, i) => {
      const yy = m.t + i * row;
      const w = max > 0 ? (it.value / max) * pw : 0;
      svg.append(s('text', { x: m.l - 8, y: yy + row / 2 + 4, 'text-anchor': 'end' }, it.label));
      svg.append(s('rect', { x: m.l, y: yy + 4, width: Math.max(it.value > 0 ? 1 : 0, w), height: row - 8, class: 's0', 'data-series': it.label }));
      svg.append(s('text', { x: m.l + w + 6, y: yy + row / 2 + 4 }, FORMATS[format](it.value)));
    });
    svg.append(s('text', { x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle' }, unit));
    return h('figure', {}, svg);
  }

  const SERIES = ['s0', 's1', 's2', 's3', 's4', 's5'];

  /** The width a chart is drawn at: its box's, so that text stays legible. */
  function chartWidth(half) {
    const full = Math.min(1200, Math.max(300, $('#main').clientWidth - 60));
    return half && window.innerWidth > 900 ? Math.max(300, full / 2 - 40) : full;
  }

  // ------------------------------------------------------------------ pages
  function params() {
    const [path, qs] = location.hash.split('?');
    return { path: path || '#/overview', q: new URLSearchParams(qs || '') };
  }

  function go(path, q) {
    const qs = q ? q.toString() : '';
    location.hash = qs ? `${path}?${qs}` : path;
  }

  function toggle(label, options, current, onPick) {
    return h(
      'div',
      { class: 'toggle', role: 'group', 'aria-label': label },
      options.map(([value, text]) => h('button', { type: 'button', 'aria-pressed': String(value === current), onclick: () => onPick(value), text })),
    );
  }

  const METRICS = {
    generations: ['Generations', 'int', 'generations per day'],
    tokens: ['Tokens', 'int', 'tokens per day'],
    cost_usd: ['Estimated cost', 'usd', 'USD per day'],
  };

  async function renderOverview(q) {
    const days = Number(q.get('days') || 30);
    const metric = METRICS[q.get('metric')] ? q.get('metric') : 'generations';
    const to = todayUtc();
    const url = `/provider/fleet/overview?date_from=${addDays(to, -(days - 1))}&date_to=${to}`;
    const r = await api(url);
    const d = r.data;
    const p = 'data';
    const usageKpi = (title, field, format) =>
      kpi(title, fig(d.usage.month_to_date[field], format, `${p}.usage.month_to_date.${field}`), [
        ['This month (to date)', fig(d.usage.month_to_date[field], format, `${p}.usage.month_to_date.${field}`)],
        ['Last 30 days', fig(d.usage.last_30_days[field], format, `${p}.usage.last_30_days.${field}`)],
        ['All time', fig(d.usage.all_time[field], format, `${p}.usage.all_time.${field}`)],
      ], 'this month to date');
    const topRows = (list, key) =>
      list.map((t, i) =>
        h(
          'tr',
          { 'data-row': t.install_id },
          h('td', {}, installLink(t.install_id)),
          h('td', { class: 'mono', text: t.account_id }),
          h('td', { text: t.plan }),
          numCell(t.generations_30d, 'int', `${p}.${key}.${i}.generations_30d`),
          numCell(t.tokens_30d, 'int', `${p}.${key}.${i}.tokens_30d`),
          numCell(t.cost_30d_usd, 'usd', `${p}.${key}.${i}.cost_30d_usd`),
          numCell(t.cost_month_to_date_usd, 'usd', `${p}.${key}.${i}.cost_month_to_date_usd`),
          numCell(t.revenue_usd, 'usd', `${p}.${key}.${i}.revenue_usd`),
          numCell(t.margin_usd, 'usd', `${p}.${key}.${i}.margin_usd`),
        ),
      );
    const topHead = [
      ['Installation'],
      ['Account'],
      ['Plan'],
      ['Generations, 30 d', true],
      ['Tokens, 30 d', true],
      ['Cost, 30 d', true],
      ['Cost this month', true],
      ['Revenue (month)', true],
      ['Margin (month)', true],
    ];
    const [mname, mformat, munit] = METRICS[metric];
    const cur = d.trend.current;
    const prev = d.trend.previous;
    const setQ = (k, v) => {
      const nq = new URLSearchParams(q);
      nq.set(k, v);
      go('#/overview', nq);
    };
    return [
      h('h1', { text: 'Overview' }, h('span', { class: 'sub', text: `${d.today} · month ${d.month}` })),
      sourced(
        url,
        h(
          'div',
          { class: 'grid' },
          kpi('Installations', fig(d.installations.total, 'int', `${p}.installations.total`), [
            ['Registered', fig(d.installations.total, 'int', `${p}.installations.total`)],
            ['Active in the last 30 days', fig(d.installations.active_30d, 'int', `${p}.installations.active_30d`)],
            ['New this month', fig(d.installations.new_this_month, 'int', `${p}.installations.new_this_month`)],
          ], 'registered'),
          usageKpi('Generations', 'generations', 'int'),
          usageKpi('Tokens', 'tokens', 'int'),
          usageKpi('Estimated cost', 'cost_usd', 'usd'),
          kpi('Revenue this month', fig(d.revenue.month_usd, 'usd', `${p}.revenue.month_usd`), [
            ['Model cost to date', fig(d.revenue.cost_month_to_date_usd, 'usd', `${p}.revenue.cost_month_to_date_usd`)],
            ['Margin to date', fig(d.revenue.margin_month_to_date_usd, 'usd', `${p}.revenue.margin_month_to_date_usd`)],
          ], 'the plans’ monthly prices'),
        ),
        panel(
          `Daily ${mname.toLowerCase()}, ${cur.date_from} to ${cur.date_to}, against the ${days} days before`,
          h(
            'div',
            { class: 'controls' },
            toggle('Range', [[7, '7 days'], [30, '30 days'], [90, '90 days']], days, (v) => setQ('days', v)),
            toggle('Measure', Object.entries(METRICS).map(([k, v]) => [k, v[0]]), metric, (v) => setQ('metric', v)),
          ),
          lineChart({
            title: `${mname} per day (UTC), this period and the previous one`,
            labels: cur.days.map((x) => x.date),
            series: [
              { name: `${cur.date_from} to ${cur.date_to}`, values: cur.days.map((x) => x[metric]), cls: 's0' },
              { name: `Previous: ${prev.date_from} to ${prev.date_to}`, values: prev.days.map((x) => x[metric]), cls: 's5', dashed: true },
            ],
            unit: munit,
            format: mformat,
          }),
          h(
            'p',
            { class: 'note' },
            'This period: ',
            fig(cur.total[metric], mformat, `${p}.trend.current.total.${metric}`),
            '; previous: ',
            fig(prev.total[metric], mformat, `${p}.trend.previous.total.${metric}`),
            '.',
          ),
        ),
        h(
          'div',
          { class: 'cols' },
          panel(
            'Revenue by plan (this month)',
            table({
              head: [['Plan'], ['Installations', true], ['Price a month', true], ['Revenue', true]],
              rows: d.revenue.by_plan.map((r, i) =>
                h(
                  'tr',
                  {},
                  h('td', { text: r.plan }),
                  numCell(r.installations, 'int', `${p}.revenue.by_plan.${i}.installations`),
                  numCell(r.monthly_price_usd, 'usd', `${p}.revenue.by_plan.${i}.monthly_price_usd`),
                  numCell(r.revenue_usd, 'usd', `${p}.revenue.by_plan.${i}.revenue_usd`),
                ),
              ),
              empty: 'No installation is registered yet.',
            }),
          ),
          panel(
            'Near or over the plan cap (this month)',
            table({
              head: [['Installation'], ['Plan'], ['Used', true], ['Cap', true], ['Of cap', true], ['Level']],
              rows: d.near_cap.map((n, i) =>
                h(
                  'tr',
                  { 'data-row': n.install_id },
                  h('td', {}, installLink(n.install_id)),
                  h('td', { text: n.plan }),
                  numCell(n.used, 'int', `${p}.near_cap.${i}.used`),
                  numCell(n.cap, 'int', `${p}.near_cap.${i}.cap`),
                  numCell(n.percent, 'pct', `${p}.near_cap.${i}.percent`),
                  h('td', {}, badge(n.level)),
                ),
              ),
              empty: 'No installation has reached its warning threshold this month.',
            }),
          ),
        ),
        panel('Top 10 installations by tokens (last 30 days)', table({ head: topHead, rows: topRows(d.top_by_tokens, 'top_by_tokens'), empty: 'No usage in the last 30 days.' })),
        panel('Top 10 installations by estimated cost (last 30 days)', table({ head: topHead, rows: topRows(d.top_by_cost, 'top_by_cost'), empty: 'No usage in the last 30 days.' })),
        h('p', { class: 'note', text: `Computed ${fmtTime(r.meta.computed_at)}; figures are at most ${r.meta.max_age_secs} s old. Revenue is the plans' monthly prices over the registered installations; margin is revenue less this month's model cost.` }),
      ),
    ];
  }

  async function renderInstallations(q) {
    const days = Number(q.get('days') || 30);
    const to = todayUtc();
    const limit = 50;
    const offset = Math.max(0, Number(q.get('offset') || 0));
    const sort = q.get('sort_by') || 'tokens';
    const order = q.get('order') || 'desc';
    const search = q.get('q') || '';
    const api_q = new URLSearchParams({ date_from: addDays(to, -(days - 1)), date_to: to, sort_by: sort, order, limit, offset });
    if (search) api_q.set('q', search);
    const url = `/api/usage/installations?${api_q}`;
    const r = await api(url);
    const form = h(
      'form',
      {
        class: 'controls',
        role: 'search',
        onsubmit: (e) => {
          e.preventDefault();
          const f = new FormData(e.target);
          const nq = new URLSearchParams();
          for (const k of ['q', 'sort_by', 'order', 'days']) if (f.get(k)) nq.set(k, f.get(k));
          go('#/installations', nq);
        },
      },
      h('label', {}, 'Search: install id, site hash or account', h('input', { type: 'search', name: 'q', value: search, size: 34 })),
      h(
        'label',
        {},
        'Sort by',
        h(
          'select',
          { name: 'sort_by' },
          [['tokens', 'Tokens'], ['cost', 'Estimated cost'], ['date', 'Last seen'], ['requests', 'Generations']].map(([v, t]) => h('option', { value: v, selected: v === sort, text: t })),
        ),
      ),
      h('label', {}, 'Order', h('select', { name: 'order' }, [['desc', 'Highest first'], ['asc', 'Lowest first']].map(([v, t]) => h('option', { value: v, selected: v === order, text: t })))),
      h('label', {}, 'Usage over', h('select', { name: 'days' }, [[7, 'Last 7 days'], [30, 'Last 30 days'], [90, 'Last 90 days'], [365, 'Last 365 days']].map(([v, t]) => h('option', { value: v, selected: v === days, text: t })))),
      h('button', { type: 'submit', text: 'Show' }),
    );
    const total = r.meta.total;
    const pageTo = Math.min(total, offset + r.installations.length);
    const pager = h(
      'div',
      { class: 'pager' },
      h('span', {}, total ? `Showing ${fmtInt(offset + 1)}–${fmtInt(pageTo)} of ` : 'Showing 0 of ', fig(total, 'int', 'meta.total')),
      h('button', {
        type: 'button',
        class: 'secondary',
        disabled: offset === 0,
        onclick: () => {
          const nq = new URLSearchParams(q);
          nq.set('offset', Math.max(0, offset - limit));
          go('#/installations', nq);
        },
        text: 'Previous page',
      }),
      h('button', {
        type: 'button',
        class: 'secondary',
        disabled: pageTo >= total,
        onclick: () => {
          const nq = new URLSearchParams(q);
          nq.set('offset', offset + limit);
          go('#/installations', nq);
        },
        text: 'Next page',
      }),
    );
    const rows = r.installations.map((it, i) =>
      h(
        'tr',
        { 'data-row': it.install_id },
        h('td', {}, installLink(it.install_id)),
        h('td', { class: 'mono', text: it.account_id }),
        h('td', { text: it.plan }),
        h('td', {}, badge(it.governance_level)),
        numCell(it.total_requests, 'int', `installations.${i}.total_requests`),
        numCell(it.total_tokens, 'int', `installations.${i}.total_tokens`),
        numCell(it.estimated_cost_usd, 'usd', `installations.${i}.estimated_cost_usd`),
        numCell(it.unique_users, 'int', `installations.${i}.unique_users`),
        numCell(it.active_days, 'int', `installations.${i}.active_days`),
        h('td', { text: fmtTime(it.first_seen) }),
        h('td', { text: fmtTime(it.last_seen) }),
      ),
    );
    return [
      h('h1', { text: 'Installations' }),
      panel(
        null,
        form,
        sourced(
          url,
          table({
            caption: `Usage ${api_q.get('date_from')} to ${to}`,
            head: [['Installation'], ['Account'], ['Plan'], ['Level'], ['Generations', true], ['Tokens', true], ['Cost', true], ['Users', true], ['Active days', true], ['First seen'], ['Last seen']],
            rows,
            empty: search ? `No installation with usage in this range matches “${search}”. Try part of an install id, the start of a site hash, or a whole account id.` : 'No installation has usage in this range. Widen the range, or send usage first.',
          }),
          pager,
        ),
      ),
    ];
  }

  const DECISION_LABELS = {
    rate_limited: ['R', 'rate limited', 's1'],
    abuse_flagged: ['A', 'abuse flagged', 's4'],
    spike_flagged: ['S', 'spike flagged', 's3'],
    cap_warning: ['W', 'cap warning', 's2'],
    cap_critical: ['C', 'cap critical', 's1'],
    blocked: ['B', 'blocked', 's4'],
    unblocked: ['U', 'unblocked', 's5'],
  };

  async function renderInstallation(q, id) {
    const view = q.get('view') === 'month' ? 'month' : 'day';
    const mark = q.get('mark');
    const to = todayUtc();
    let from = view === 'day' ? addDays(to, -89) : monthStart(to, 11);
    if (mark && /^\d{4}-\d{2}-\d{2}$/.test(mark) && mark < from) from = mark;
    const enc = encodeURIComponent(id);
    const base = `install_id=${enc}&date_from=${from}&date_to=${to}`;
    const urls = {
      info: `/provider/installations/${enc}`,
      timeline: `/provider/usage/summary?${base}&group_by=${view}&limit=1000`,
      users: `/provider/usage/summary?${base}&group_by=user&limit=20`,
      sources: `/provider/usage/summary?${base}&group_by=source&limit=100`,
      models: `/provider/usage/summary?${base}&group_by=model&limit=100`,
      decisions: `/provider/usage/decisions?${base}&limit=1000`,
    };
    const [info, timeline, users, sources, models, decisions] = await Promise.all(Object.values(urls).map((u) => api(u)));
    const d = info.data;
    const labels = view === 'day' ? daysBetween(from, to) : daysBetween(from, to).filter((x) => x.endsWith('-01')).map((x) => x.slice(0, 7));
    const byKey = new Map(timeline.data.map((row) => [view === 'day' ? row.date : row.month, row]));
    const series = (field) => labels.map((l) => (byKey.get(l) ? byKey.get(l)[field] : 0));
    const keyOf = (at) => (view === 'day' ? at.slice(0, 10) : at.slice(0, 7));
    const starts = decisions.decisions.filter((x) => x.phase === 'start' || x.phase === 'alert');
    // One mark per period and kind, oldest first, stacked where they meet.
    const grouped = new Map();
    for (const x of starts.slice().reverse()) {
      const key = `${keyOf(x.at)}|${x.kind}`;
      if (!grouped.has(key)) grouped.set(key, []);
      grouped.get(key).push(x);
    }
    const seenAt = new Map();
    const marks = [...grouped.values()].map((xs) => {
      const x = xs[0];
      const [label, name, cls] = DECISION_LABELS[x.kind] || ['?', x.kind, 's5'];
      const index = labels.indexOf(keyOf(x.at));
      const row = seenAt.get(index) || 0;
      seenAt.set(index, row + 1);
      const times = xs.length > 1 ? ` (${xs.length} times)` : '';
      return { index, label, cls, row, title: `${name}${times}, first at ${fmtTime(x.at)}: ${x.reason}` };
    });
    if (mark) {
      const index = labels.indexOf(view === 'day' ? mark : mark.slice(0, 7));
      marks.push({ index, label: '▲ anomaly', cls: 's4', row: seenAt.get(index) || 0, title: `The anomaly of ${mark}` });
    }
    const setView = (v) => {
      const nq = new URLSearchParams(q);
      nq.set('view', v);
      go(`#/installations/${enc}`, nq);
    };
    const cap = d.cap;
    const capBar = cap.cap
      ? h(
          'div',
          { class: 'cap', role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': cap.cap, 'aria-valuenow': cap.used, 'aria-label': 'Generations this billing month against the cap' },
          h('div', { class: `fill ${cap.level}`, style: null, 'data-width': Math.min(100, cap.percent) }),
          cap.thresholds.map((t) => h('div', { class: `tick${t.percent >= 95 ? ' end' : ''}`, 'data-left': Math.min(100, t.percent), title: `${t.level} at ${fmtInt(t.at)}` }, h('span', { text: `${fmtDec1(t.percent)}%` }))),
        )
      : null;
    const exportForm = h(
      'form',
      {
        class: 'controls',
        onsubmit: async (e) => {
          e.preventDefault();
          const f = new FormData(e.target);
          const status = $('#export-status');
          status.textContent = 'Preparing the CSV…';
          try {
            const response = await sendJson('POST', '/api/usage/export', {
              install_id: id,
              date_from: f.get('date_from'),
              date_to: f.get('date_to'),
              group_by: f.get('group_by'),
              format: 'csv',
            });
            const blob = await response.blob();
            const a = h('a', { href: URL.createObjectURL(blob), download: `usage-${id}-${f.get('date_from')}-${f.get('date_to')}.csv` });
            document.body.append(a);
            a.click();
            a.remove();
            status.textContent = `Downloaded ${fmtInt(blob.size)} bytes.`;
          } catch (err) {
            status.textContent = `The export failed: ${err.message}`;
          }
        },
      },
      h('label', {}, 'From (UTC)', h('input', { type: 'date', name: 'date_from', value: addDays(to, -29), required: true })),
      h('label', {}, 'To (UTC)', h('input', { type: 'date', name: 'date_to', value: to, required: true })),
      h('label', {}, 'Rows', h('select', { name: 'group_by' }, [['day', 'Per day'], ['events', 'Each generation'], ['user', 'Per user'], ['source', 'Per source'], ['model', 'Per model']].map(([v, t]) => h('option', { value: v, text: t })))),
      h('button', { type: 'submit', text: 'Download CSV' }),
      h('span', { id: 'export-status', class: 'note', role: 'status' }),
    );
    const shareRows = (resp, field, label) =>
      resp.data.map((row, i) =>
        h('tr', {}, field === 'user_hash' ? h('td', { class: 'mono', title: row.user_hash, text: `${row.user_hash.slice(0, 16)}…` }) : h('td', { text: row[field] || label }), numCell(row.total_requests, 'int', `data.${i}.total_requests`), numCell(row.total_tokens, 'int', `data.${i}.total_tokens`), numCell(row.estimated_cost_usd, 'usd', `data.${i}.estimated_cost_usd`)),
      );
    const shareHead = (name) => [[name], ['Generations', true], ['Tokens', true], ['Cost', true]];
    return [
      h('h1', { text: 'Installation' }, h('span', { class: 'sub mono', text: id })),
      sourced(
        urls.info,
        h(
          'div',
          { class: 'grid' },
          kpi('Plan and governance', h('span', {}, d.plan, ' ', badge(cap.level)), [
            ['Account', h('span', { class: 'mono', text: d.account_id })],
            ['Open episodes', d.open_episodes.length ? d.open_episodes.map((e) => e.kind.replace('_', ' ')).join(', ') : 'none'],
          ]),
          kpi('Generations this month', fig(d.usage.month_to_date.generations, 'int', 'data.usage.month_to_date.generations'), [
            ['Tokens', fig(d.usage.month_to_date.tokens, 'int', 'data.usage.month_to_date.tokens')],
            ['Estimated cost', fig(d.usage.month_to_date.cost_usd, 'usd', 'data.usage.month_to_date.cost_usd')],
          ]),
          kpi('All time', fig(d.usage.all_time.generations, 'int', 'data.usage.all_time.generations'), [
            ['Tokens', fig(d.usage.all_time.tokens, 'int', 'data.usage.all_time.tokens')],
            ['Estimated cost', fig(d.usage.all_time.cost_usd, 'usd', 'data.usage.all_time.cost_usd')],
          ]),
        ),
        panel(
          `Cap progress, billing month ${cap.billing_month}`,
          cap.cap
            ? h('p', {}, 'Used ', fig(cap.used, 'int', 'data.cap.used'), ' of ', fig(cap.cap, 'int', 'data.cap.cap'), ' generations (', fig(cap.percent, 'pct', 'data.cap.percent'), '). ', `Warning, critical and block at ${cap.thresholds.map((t) => `${fmtDec1(t.percent)}% (${fmtInt(t.at)})`).join(', ')}.`)
            : h('p', {}, 'This plan has no monthly cap; used ', fig(cap.used, 'int', 'data.cap.used'), ' generations this billing month.'),
          capBar,
        ),
        panel(
          'About this installation',
          h(
            'dl',
            { class: 'facts' },
            [
              ['First seen', fmtTime(d.first_seen)],
              ['Last seen', fmtTime(d.last_seen)],
              ['Plugin version', d.plugin_version || '—'],
              ['WordPress version', d.wordpress_version || '—'],
              ['PHP version', d.php_version || '—'],
              ['Site hash', d.site_hash || '—'],
              ['Multisite', d.is_multisite ? `yes (site ${d.wp_site_id ?? '—'})` : 'no'],
              ['Signature policy', d.signature_policy],
              ['Registered', fmtTime(d.registered_at)],
            ].map(([k, v]) => h('div', {}, h('dt', { text: k }), h('dd', { text: v }))),
          ),
        ),
      ),
      sourced(
        urls.timeline,
        panel(
          view === 'day' ? `Generations per day, ${from} to ${to}` : `Generations per month, ${from.slice(0, 7)} to ${to.slice(0, 7)}`,
          h('div', { class: 'controls' }, toggle('Timeline', [['day', 'Daily'], ['month', 'Monthly']], view, setView)),
          lineChart({
            title: `Generations per ${view} (UTC) with governance decisions`,
            labels,
            series: [{ name: 'Generations', values: series('total_requests'), cls: 's0' }],
            marks,
            unit: `generations per ${view}`,
            format: 'int',
            xTitle: view === 'day' ? 'Day (UTC)' : 'Month (UTC)',
          }),
          h('p', { class: 'note', text: 'Marks: R rate limited, A abuse flagged, S spike flagged, W cap warning, C cap critical, B blocked, U unblocked.' }),
        ),
      ),
      h(
        'div',
        { class: 'cols' },
        sourced(urls.users, panel('Top users (hashed)', table({ head: shareHead('User hash'), rows: shareRows(users, 'user_hash', '—'), empty: 'No usage in this range.' }))),
        h(
          'div',
          {},
          sourced(urls.sources, panel('Sources', table({ head: shareHead('Source'), rows: shareRows(sources, 'source', '—'), empty: 'No usage in this range.' }))),
          sourced(urls.models, panel('Models', table({ head: shareHead('Model'), rows: shareRows(models, 'model', '—'), empty: 'No usage in this range.' }))),
        ),
      ),
      sourced(
        urls.decisions,
        panel(
          'Governance history',
          table({
            head: [['When (UTC)'], ['Decision'], ['Phase'], ['Why'], ['Until (UTC)']],
            rows: decisions.decisions.map((x) =>
              h('tr', { class: mark && x.at.startsWith(mark) ? 'marked' : null }, h('td', { text: fmtTime(x.at) }), h('td', { text: x.kind.replace(/_/g, ' ') }), h('td', { text: x.phase }), h('td', { class: 'wrap', text: x.reason }), h('td', { text: x.until ? fmtTime(x.until) : '—' })),
            ),
            empty: 'No rate limit, flag, cap alert or block in this range.',
          }),
        ),
      ),
      panel('Export (the contract’s CSV)', exportForm),
    ];
  }

  async function renderAnalytics(q) {
    const days = Number(q.get('days') || 30);
    const to = todayUtc();
    const url = `/provider/fleet/analytics?date_from=${addDays(to, -(days - 1))}&date_to=${to}&months=12`;
    const r = await api(url);
    const d = r.data;
    const shareChart = (list, what) => {
      const names = [...new Set(list.map((x) => x.name))];
      const cell = (month, name) => list.find((x) => x.month === month && x.name === name);
      return stackedBars({
        title: `${what}: share of generations per month (UTC)`,
        labels: d.months,
        stacks: names.map((name, i) => ({ name, cls: SERIES[i % SERIES.length], values: d.months.map((m) => (cell(m, name) ? cell(m, name).share_percent : 0)) })),
        unit: '% of generations',
        format: 'pct',
        max: 100,
        half: true,
      });
    };
    const last = d.months[d.months.length - 1];
    const shareTable = (list, key, what) =>
      table({
        caption: `${what}, ${last}`,
        head: [[what], ['Generations', true], ['Share', true], ['Installations', true], ['Cost', true]],
        rows: list
          .map((x, i) => [x, i])
          .filter(([x]) => x.month === last)
          .map(([x, i]) => h('tr', {}, h('td', { text: x.name }), numCell(x.generations, 'int', `data.${key}.${i}.generations`), numCell(x.share_percent, 'pct', `data.${key}.${i}.share_percent`), numCell(x.installations, 'int', `data.${key}.${i}.installations`), numCell(x.cost_usd, 'usd', `data.${key}.${i}.cost_usd`))),
        empty: 'No usage this month yet.',
      });
    const bucketLabel = (b) => (b.max === 0 ? '0' : b.max === null ? `${fmtInt(b.min)}+` : `${fmtInt(b.min)}–${fmtInt(b.max)}`);
    const setDays = (v) => go('#/analytics', new URLSearchParams({ days: v }));
    return [
      h('h1', { text: 'Analytics' }),
      sourced(
        url,
        panel(
          `Across installations, ${d.date_from} to ${d.date_to}`,
          h('div', { class: 'controls' }, toggle('Range', [[30, '30 days'], [90, '90 days'], [365, '365 days']], days, setDays)),
          lineChart({ title: 'Generations per day (UTC)', labels: d.daily.map((x) => x.date), series: [{ name: 'Generations', values: d.daily.map((x) => x.generations), cls: 's0' }], unit: 'generations per day', format: 'int' }),
          lineChart({ title: 'Active installations per day (UTC)', labels: d.daily.map((x) => x.date), series: [{ name: 'Installations with usage', values: d.daily.map((x) => x.active_installations), cls: 's2' }], unit: 'installations', format: 'int', height: 200 }),
          lineChart({ title: 'Estimated cost per day (UTC)', labels: d.daily.map((x) => x.date), series: [{ name: 'Estimated cost', values: d.daily.map((x) => x.cost_usd), cls: 's1' }], unit: 'USD per day', format: 'usd', height: 200 }),
        ),
        h('div', { class: 'cols' }, panel('Model adoption', shareChart(d.models, 'Models'), shareTable(d.models, 'models', 'Model')), panel('Source popularity', shareChart(d.sources, 'Sources'), shareTable(d.sources, 'sources', 'Source'))),
        h(
          'div',
          { class: 'cols' },
          panel(
            `Cost by model, ${d.date_from} to ${d.date_to}`,
            hBars({ title: 'Estimated cost by model', items: d.cost_by_model.map((x) => ({ label: x.model, value: x.cost_usd })), format: 'usd', unit: 'USD', half: true }),
            table({
              head: [['Model'], ['Generations', true], ['Tokens', true], ['Cost', true], ['Cost per 1,000 generations', true]],
              rows: d.cost_by_model.map((x, i) => h('tr', {}, h('td', { text: x.model }), numCell(x.generations, 'int', `data.cost_by_model.${i}.generations`), numCell(x.tokens, 'int', `data.cost_by_model.${i}.tokens`), numCell(x.cost_usd, 'usd', `data.cost_by_model.${i}.cost_usd`), numCell(x.cost_per_1k_generations_usd, 'usd', `data.cost_by_model.${i}.cost_per_1k_generations_usd`))),
              empty: 'No usage in this range.',
            }),
          ),
          panel(
            `Installations by generations in ${d.distribution.month}`,
            hBars({ title: `Installations by generations in ${d.distribution.month}`, items: d.distribution.buckets.map((b) => ({ label: bucketLabel(b), value: b.installations })), format: 'int', unit: 'installations', half: true }),
            table({
              head: [['Generations in the month'], ['Installations', true]],
              rows: d.distribution.buckets.map((b, i) => h('tr', {}, h('td', { text: bucketLabel(b) }), numCell(b.installations, 'int', `data.distribution.buckets.${i}.installations`))),
            }),
          ),
        ),
      ),
    ];
  }

  async function renderProjection(q) {
    const limit = 20;
    const offset = Math.max(0, Number(q.get('offset') || 0));
    const url = `/provider/fleet/projection?limit=${limit}&offset=${offset}`;
    const r = await api(url);
    const d = r.data;
    const f = d.fleet;
    const monthDays = daysBetween(`${d.month}-01`, d.month_end);
    const actualBy = new Map();
    let run = 0;
    for (const a of f.actual) {
      run += a.cost_usd;
      actualBy.set(a.date, run);
    }
    const pathBy = new Map(f.path.map((x) => [x.date, x.cost_usd]));
    const interval = (fc, format, path) => h('span', {}, fig(fc.low, format, `${path}.low`), ' – ', fig(fc.high, format, `${path}.high`));
    const rows = d.installations.map((it, i) =>
      h(
        'tr',
        { 'data-row': it.install_id },
        h('td', {}, installLink(it.install_id)),
        numCell(it.generations.month_to_date, 'int', `data.installations.${i}.generations.month_to_date`),
        numCell(it.generations.expected, 'int', `data.installations.${i}.generations.expected`),
        h('td', { class: 'num' }, interval(it.generations, 'int', `data.installations.${i}.generations`)),
        numCell(it.cost_usd.month_to_date, 'usd', `data.installations.${i}.cost_usd.month_to_date`),
        numCell(it.cost_usd.expected, 'usd', `data.installations.${i}.cost_usd.expected`),
        h('td', { class: 'num' }, interval(it.cost_usd, 'usd', `data.installations.${i}.cost_usd`)),
      ),
    );
    const total = r.meta.total;
    const pageTo = Math.min(total, offset + d.installations.length);
    const weekdays = ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'];
    return [
      h('h1', { text: 'Cost projection' }, h('span', { class: 'sub', text: `month ${d.month}, as of ${d.as_of.replace('T', ' ').replace('Z', ' UTC')}` })),
      sourced(
        url,
        h(
          'div',
          { class: 'grid' },
          kpi('Month-end cost, expected', fig(f.cost_usd.expected, 'usd', 'data.fleet.cost_usd.expected'), [
            ['80% interval', interval(f.cost_usd, 'usd', 'data.fleet.cost_usd')],
            ['So far this month', fig(f.cost_usd.month_to_date, 'usd', 'data.fleet.cost_usd.month_to_date')],
          ]),
          kpi('Month-end generations, expected', fig(f.generations.expected, 'int', 'data.fleet.generations.expected'), [
            ['80% interval', interval(f.generations, 'int', 'data.fleet.generations')],
            ['So far this month', fig(f.generations.month_to_date, 'int', 'data.fleet.generations.month_to_date')],
          ]),
        ),
        panel(
          `Cumulative estimated cost in ${d.month}`,
          lineChart({
            title: `Cumulative cost this month (UTC days): actual, then projected with an 80% interval`,
            labels: monthDays,
            series: [
              { name: 'Actual, cumulative', values: monthDays.map((x) => (actualBy.has(x) ? actualBy.get(x) : null)), cls: 's0' },
              { name: 'Projected, cumulative', values: monthDays.map((x) => (pathBy.has(x) ? pathBy.get(x).expected : null)), cls: 's1', dashed: true },
            ],
            band: { name: '80% interval', cls: 's1', low: monthDays.map((x) => (pathBy.has(x) ? pathBy.get(x).low : null)), high: monthDays.map((x) => (pathBy.has(x) ? pathBy.get(x).high : null)) },
            unit: 'USD, cumulative',
            format: 'usd',
          }),
          h('p', { class: 'method' }, h('strong', { text: 'Method. ' }), d.method),
          table({
            caption: 'Day-of-week factors (the fleet, last 28 complete days)',
            head: weekdays.map((w) => [w, true]),
            rows: [h('tr', {}, d.weekday_factors.map((v, i) => numCell(v, 'dec2', `data.weekday_factors.${i}`)))],
          }),
        ),
        panel(
          'Installations by projected month-end cost',
          table({
            head: [['Installation'], ['Generations so far', true], ['Generations, expected', true], ['80% interval', true], ['Cost so far', true], ['Cost, expected', true], ['80% interval', true]],
            rows,
            empty: 'No installation has usage in the last 28 days or this month.',
          }),
          h(
            'div',
            { class: 'pager' },
            h('span', {}, total ? `Showing ${fmtInt(offset + 1)}–${fmtInt(pageTo)} of ` : 'Showing 0 of ', fig(total, 'int', 'meta.total')),
            h('button', { type: 'button', class: 'secondary', disabled: offset === 0, onclick: () => go('#/projection', new URLSearchParams({ offset: Math.max(0, offset - limit) })), text: 'Previous page' }),
            h('button', { type: 'button', class: 'secondary', disabled: pageTo >= total, onclick: () => go('#/projection', new URLSearchParams({ offset: offset + limit })), text: 'Next page' }),
          ),
        ),
      ),
    ];
  }

  async function renderAnomalies(q) {
    const days = Number(q.get('days') || 7);
    const url = `/provider/fleet/anomalies?days=${days}`;
    const r = await api(url);
    const d = r.data;
    const rows = d.anomalies.map((a, i) =>
      h(
        'tr',
        { 'data-row': `${a.install_id}:${a.kind}` },
        numCell(i + 1, 'int', null),
        numCell(a.score, 'dec1', `data.anomalies.${i}.score`),
        h('td', {}, installLink(a.install_id, `?mark=${a.date}`)),
        h('td', { class: 'mono', text: a.account_id }),
        h('td', { text: a.plan }),
        h('td', { text: a.kind.replace(/_/g, ' ') }),
        h('td', { text: a.date }),
        h('td', { class: 'wrap', text: a.detail }),
      ),
    );
    return [
      h('h1', { text: 'Anomalies' }, h('span', { class: 'sub', text: `${d.date_from} to ${d.date_to}` })),
      sourced(
        url,
        panel(
          null,
          h('div', { class: 'controls' }, toggle('Days examined', [[7, 'Last 7 days'], [14, 'Last 14 days'], [28, 'Last 28 days']], days, (v) => go('#/anomalies', new URLSearchParams({ days: v })))),
          h('p', { class: 'method' }, h('strong', { text: 'Method. ' }), d.method),
          table({
            head: [['Rank', true], ['Score', true], ['Installation'], ['Account'], ['Plan'], ['Kind'], ['Day (UTC)'], ['What happened']],
            rows,
            empty: 'No installation departed from its own baseline, and governance flagged none, in these days.',
          }),
        ),
      ),
    ];
  }

  const ROUTES = [
    [/^#\/overview$/, 'overview', renderOverview],
    [/^#\/installations$/, 'installations', renderInstallations],
    [/^#\/installations\/([^/]+)$/, 'installations', renderInstallation],
    [/^#\/analytics$/, 'analytics', renderAnalytics],
    [/^#\/projection$/, 'projection', renderProjection],
    [/^#\/anomalies$/, 'anomalies', renderAnomalies],
  ];

  function errorState(err, retry) {
    let what;
    if (err.status === 403) what = `This sign-in may not see this page: ${err.message}. Sign in with a token that may, or go back to a page it may see.`;
    else if (err.status === 404) what = 'There is no such installation, or it was erased.';
    else if (err.status === 503) what = `${err.message}: the storage is unavailable for now. Retry in a few seconds.`;
    else if (err.status === 400) what = `The request was refused: ${err.message}.`;
    else what = err.message;
    return panel(null, h('p', { class: 'error-state', role: 'alert', text: what }), h('p', { class: 'empty' }, h('button', { type: 'button', onclick: retry, text: 'Retry' })));
  }

  function layoutBars() {
    // Widths from data attributes: the CSP forbids inline style attributes
    // in the markup, but the CSSOM may set them.
    for (const el of page.querySelectorAll('[data-width]')) el.style.width = `${el.dataset.width}%`;
    for (const el of page.querySelectorAll('[data-left]')) el.style.left = `${el.dataset.left}%`;
  }

  async function render() {
    if (!state.session) return;
    const { path, q } = params();
    const route = ROUTES.find(([re]) => re.test(path));
    if (!route) {
      go('#/overview');
      return;
    }
    const [re, name, draw] = route;
    const match = path.match(re);
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.dataset.page === name) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const token = ++state.render;
    const started = performance.now();
    page.dataset.state = 'loading';
    page.dataset.route = path;
    page.replaceChildren(h('p', { class: 'loading', role: 'status', text: 'Loading…' }));
    try {
      const content = await draw(q, ...match.slice(1).map(decodeURIComponent));
      if (token !== state.render) return;
      page.replaceChildren(...content);
      layoutBars();
      document.title = `${content[0].firstChild ? content[0].firstChild.textContent : 'Usage'} · Usage dashboard`;
      page.dataset.drawnMs = String(Math.round(performance.now() - started));
      page.dataset.state = 'ready';
    } catch (err) {
      if (token !== state.render) return;
      if (err.status === 401) {
        signedOut(`Your session ended or the token is no longer valid (${err.message}). Sign in again.`);
        return;
      }
      page.replaceChildren(h('h1', { text: 'Something went wrong' }), errorState(err, render));
      page.dataset.state = 'error';
      if (!(err instanceof ApiError)) console.error(err);
    }
  }

  // ---------------------------------------------------------------- session
  function signedIn(session) {
    state.session = session;
    $('#sign-in').hidden = true;
    $('#nav').hidden = false;
    $('#who').hidden = false;
    const scope = session.account_id ? ` · account ${session.account_id}` : '';
    $('#who-text').textContent = `${session.role.replace('_', ' ')}${scope}`;
    render();
  }

  function signedOut(message) {
    state.session = null;
    page.replaceChildren();
    page.dataset.state = 'signed-out';
    $('#nav').hidden = true;
    $('#who').hidden = true;
    $('#sign-in').hidden = false;
    $('#sign-in-error').textContent = message || '';
    $('#token').focus();
  }

  $('#sign-in-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const field = $('#token');
    const token = field.value.trim();
    if (!token) return;
    try {
      const r = await sendJson('POST', '/dashboard/session', { token });
      field.value = '';
      $('#sign-in-error').textContent = '';
      if (!location.hash) location.hash = '#/overview';
      signedIn(r.session);
    } catch (err) {
      $('#sign-in-error').textContent = `Not signed in: ${err.message}.`;
    }
  });

  $('#sign-out').addEventListener('click', async () => {
    try {
      await sendJson('DELETE', '/dashboard/session');
    } finally {
      signedOut('Signed out.');
    }
  });

  window.addEventListener('hashchange', () => {
    render();
    $('#main').focus({ preventScroll: true });
  });

  api('/dashboard/session')
    .then((r) => signedIn(r.session))
    .catch((err) => signedOut(err.status === 401 ? '' : err.message));
})();
