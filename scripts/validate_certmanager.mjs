#!/usr/bin/env node
// Validates cert-manager Certificate and Issuer documents (deploy/kubernetes/overlays/tls) with
// the models of the npm package @kubernetes-models/cert-manager (generated from cert-manager's
// CRDs), the way scripts/validate_servicemonitor.mjs validates ServiceMonitors. Driven by
// scripts/validate_deploy.py; the packages are installed by scripts/validate-deploy.sh.
//
//   node scripts/validate_certmanager.mjs NPM_DIR < documents.json > result.json
//
// Two layers, both from the package: its compiled JSON-schema validator (types, enums, required
// fields) and a TypeScript check of each document as an object literal of ICertificate or
// IIssuer (excess-property checks reject unknown fields at every level). Self-tests: a valid
// Certificate and Issuer must be accepted and broken copies rejected, so that a validator that
// accepts everything fails the run. Output: the same JSON shape as validate_servicemonitor.mjs.
// Exit status 0 whenever the result was written, 2 on misuse.

import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const PKG = "@kubernetes-models/cert-manager";
const KINDS = { Certificate: "ICertificate", Issuer: "IIssuer" };

function usage(msg) {
    process.stderr.write(`${msg}\nusage: node validate_certmanager.mjs NPM_DIR < documents.json\n`);
    process.exit(2);
}

const npmDir = process.argv[2];
if (!npmDir) usage("missing NPM_DIR");
const modules = path.resolve(npmDir, "node_modules");
const pkgDir = path.join(modules, PKG);
if (!fs.existsSync(path.join(pkgDir, "package.json"))) usage(`${PKG} is not installed in ${modules}`);
const pkgVersion = JSON.parse(fs.readFileSync(path.join(pkgDir, "package.json"), "utf8")).version;
const models = {};
for (const kind of Object.keys(KINDS)) {
    models[kind] = (await import(pathToFileURL(path.join(pkgDir, `cert-manager.io/v1/${kind}.js`)).href))[kind];
}
const ts = createRequire(path.join(modules, "x.js"))("typescript");

const docs = JSON.parse(fs.readFileSync(0, "utf8"));
if (!Array.isArray(docs)) usage("stdin must be a JSON array of cert-manager documents");

function schemaErrors(doc) {
    const Model = models[doc?.kind];
    if (doc?.apiVersion !== "cert-manager.io/v1" || !Model) {
        return [`schema: not a cert-manager.io/v1 ${Object.keys(KINDS).join(" or ")}: ${doc?.apiVersion} ${doc?.kind}`];
    }
    try {
        new Model(structuredClone(doc)).validate();
        return [];
    } catch (e) {
        const errs = e && Array.isArray(e.errors) ? e.errors : null;
        if (errs && errs.length) {
            return errs.map((x) => `schema: ${x.instancePath || "/"} ${x.message}${x.params && x.params.allowedValues ? ` (${x.params.allowedValues.join(", ")})` : ""}`);
        }
        return [`schema: ${String((e && e.message) || e).split("\n").join("; ")}`];
    }
}

function typeErrors(items) {
    const dir = fs.mkdtempSync(path.join(path.resolve(npmDir), "check-"));
    try {
        const files = items.map((doc, i) => {
            const kind = KINDS[doc?.kind] ? doc.kind : "Certificate";
            const file = path.join(dir, `doc${i}.ts`);
            const text =
                `import type { ${KINDS[kind]} } from "${PKG}/cert-manager.io/v1/${kind}";\n` +
                `export const doc: ${KINDS[kind]} = ${JSON.stringify(doc, null, 2)};\n`;
            fs.writeFileSync(file, text);
            return { file, lines: text.split("\n") };
        });
        const program = ts.createProgram(
            files.map((f) => f.file),
            {
                strict: true,
                noEmit: true,
                skipLibCheck: true,
                types: [],
                target: ts.ScriptTarget.ES2022,
                module: ts.ModuleKind.ESNext,
                moduleResolution: ts.ModuleResolutionKind.Bundler,
            },
        );
        const out = items.map(() => []);
        for (const d of ts.getPreEmitDiagnostics(program)) {
            const msg = ts.flattenDiagnosticMessageText(d.messageText, "; ");
            const i = d.file ? files.findIndex((f) => path.resolve(f.file) === path.resolve(d.file.fileName)) : -1;
            if (i < 0) {
                out.forEach((o) => o.push(`types: ${msg}`));
                continue;
            }
            const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
            out[i].push(`types: line ${line + 1} \`${files[i].lines[line].trim()}\`: ${msg}`);
        }
        return out;
    } finally {
        fs.rmSync(dir, { recursive: true, force: true });
    }
}

// ---- self-tests on fixed valid documents --------------------------------------------------------
const certificate = {
    apiVersion: "cert-manager.io/v1",
    kind: "Certificate",
    metadata: { name: "selftest", namespace: "selftest" },
    spec: {
        secretName: "selftest-tls",
        dnsNames: ["*.selftest.svc.cluster.local"],
        usages: ["server auth", "client auth"],
        privateKey: { algorithm: "ECDSA", size: 256, rotationPolicy: "Always" },
        issuerRef: { name: "selftest-ca", kind: "Issuer" },
    },
};
const issuer = {
    apiVersion: "cert-manager.io/v1",
    kind: "Issuer",
    metadata: { name: "selftest-ca", namespace: "selftest" },
    spec: { ca: { secretName: "selftest-ca" } },
};
const mutate = (base, f) => {
    const d = structuredClone(base);
    f(d);
    return d;
};
const selftests = [
    ["a valid Certificate", "accept", mutate(certificate, () => {})],
    ["a valid Issuer", "accept", mutate(issuer, () => {})],
    ["unknown Certificate spec field (dnsName)", "reject", mutate(certificate, (d) => { d.spec.dnsName = ["x"]; })],
    ["unknown privateKey field (rotation)", "reject", mutate(certificate, (d) => { d.spec.privateKey.rotation = "Always"; })],
    ["bad enum (usage \"server-auth\")", "reject", mutate(certificate, (d) => { d.spec.usages = ["server-auth"]; })],
    ["bad enum (algorithm RSA4096)", "reject", mutate(certificate, (d) => { d.spec.privateKey.algorithm = "RSA4096"; })],
    ["wrong type (dnsNames a string)", "reject", mutate(certificate, (d) => { d.spec.dnsNames = "x.example"; })],
    ["missing secretName", "reject", mutate(certificate, (d) => { delete d.spec.secretName; })],
    ["missing issuerRef", "reject", mutate(certificate, (d) => { delete d.spec.issuerRef; })],
    ["unknown Issuer ca field (secret)", "reject", mutate(issuer, (d) => { d.spec.ca.secret = "x"; })],
];

const all = [...docs, ...selftests.map((t) => t[2])];
const typed = typeErrors(all);
const errorsOf = (i) => [...schemaErrors(all[i]), ...typed[i]];
const result = {
    validator: `${PKG}@${pkgVersion} schema + typescript@${ts.version} types`,
    documents: docs.map((d, i) => ({ index: i, name: d?.metadata?.name ?? null, errors: errorsOf(i) })),
    selftests: selftests.map(([name, expect], j) => {
        const errors = errorsOf(docs.length + j);
        return { name, expect, errors, ok: expect === "accept" ? errors.length === 0 : errors.length > 0 };
    }),
};
process.stdout.write(JSON.stringify(result, null, 2) + "\n");
