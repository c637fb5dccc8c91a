/*
 * A self-signed certificate for the C harnesses' TLS links (tests/fuzz/fuzz_link.c,
 * tests/native/tsan_plane.c): an EC P-256 key and a certificate that is its
 * own CA, naming IP 127.0.0.1, written as PEM to two temporary files made from
 * the templates given (mkstemp).  Each end uses it as its certificate and as
 * the CA it trusts, so native/link.c's mutual verification passes.  Aborts on
 * any failure: a harness cannot go on without it.
 */
#ifndef UFFD_MIGRATE_SELFSIGNED_H
#define UFFD_MIGRATE_SELFSIGNED_H

#include <stdio.h>
#include <stdlib.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

static void selfsigned_require(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "making a self-signed certificate: %s failed\n", what);
        abort();
    }
}

static void make_self_signed(char *cert_path, char *key_path)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    selfsigned_require(key && x, "a key");
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24 * 365);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"uffd-migrate test", -1, -1, 0);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, key);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    const char *exts[][2] = { { "basicConstraints", "critical,CA:TRUE" },
                              { "keyUsage", "critical,digitalSignature,keyCertSign" },
                              { "subjectAltName", "IP:127.0.0.1" },
                              { "subjectKeyIdentifier", "hash" } };
    for (size_t i = 0; i < sizeof exts / sizeof exts[0]; i++) {
        X509_EXTENSION *e = X509V3_EXT_conf(NULL, &ctx, exts[i][0], exts[i][1]);
        selfsigned_require(e && X509_add_ext(x, e, -1), exts[i][0]);
        X509_EXTENSION_free(e);
    }
    selfsigned_require(X509_sign(x, key, EVP_sha256()) > 0, "signing");
    FILE *f = fdopen(mkstemp(cert_path), "w");
    selfsigned_require(f && PEM_write_X509(f, x), "writing the certificate");
    fclose(f);
    f = fdopen(mkstemp(key_path), "w");
    selfsigned_require(f && PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL), "writing the key");
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(key);
}

#endif
